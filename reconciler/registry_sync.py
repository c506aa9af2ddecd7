"""Proxies' registrations shared between control-plane replicas, through the store (issue 9).

    proxy ─► replica A: Registry.heartbeat / report ─► published(id) ─► newest record per
                                                      (changed, or due   proxy, queued
                                                       for a refresh)           │
             writer thread (lingers LINGER s): put_many(proxies/<id> ...) ◄─────┘
                                  │ etcd
                                  ▼ watch (every replica's mirror)
    replica B, on its loop: Registry.apply(record, seen_ago) ─► Rollout.on_report, when
                            the record's ACK/NACK part differs from what B held

A proxy talks to one replica; each replica writes the records of the proxies that talk
to it (`RegistrationRecord`, JSON under `proxies/<id>`), and applies everybody else's as
its watch sees them, so every replica's endpoint table and `/v1/status` list every proxy,
and the leader's rollout counts ACKs and NACKs wherever they were reported. A replica
ignores its own records coming back through the watch (it applied them first-hand).

Fewer writes. A heartbeat that changes nothing but the proxy's age is not worth a write
to etcd and an apply on every other replica (at 1,000 proxies that was most of an idle
replica's CPU). `published` queues a record only when what it says changed (service,
version, address, the release the proxy runs, its last NACK) or when the last record
written for that proxy is `refresh` seconds old (default ttl/2). Why a live proxy never
goes stale elsewhere: another replica's `Registry.apply` places the record at its
`seen_at` and `sweep` marks the proxy stale once that is more than `ttl` ago, so records
must follow each other within ttl. Contacts come every heartbeat interval, ttl/3 (what the
heartbeat answer asks for), so a refresh goes out with the first contact at least ttl/2
after the last write: at most ttl/2 + ttl/3 = 5·ttl/6 later, and 2·ttl/3 later on a steady
cadence (the second heartbeat after a write). The ttl/6 left covers a late heartbeat and
the watch's delivery. Every replica must run the same `--proxy-ttl`, as before. The
flip side: a proxy that stops is marked stale by the other replicas between ttl/2 and ttl
after its last contact (its last record may be up to ttl/2 older than that contact), by
its own replica after ttl. A record still waiting in the queue is always replaced by the
newest (it costs no extra write); a record from another replica about the same proxy (it
failed over and back) makes the next contact here write at once. `requests_total` rides along whenever a record is written, so
the other replicas compute a proxy's request rate from sparser samples (about every
2·ttl/3 instead of ttl/3): the same slope, refreshed less often. `written` counts the
records put to the store (deletions not included).

Records are written off the event loop, by one thread, in batches of up to `max_batch`:
after the first record of a batch is queued the writer lingers up to `linger` seconds
(LINGER) for more, unless the batch fills first, so a burst of heartbeats costs one
transaction. The queue keeps one record per proxy (a newer one replaces an older), so it
is bounded by the registry, however long the store is away: while writes fail the thread
keeps the records and tries again with jittered backoff (capped at 5 s). Ages travel as
wall-clock `seen_at`; the receiving registry turns them into its own clock (`seen_ago`),
clamped so a replica whose clock runs ahead cannot make a record younger than now.

The leader prunes: `prune` deletes the records of proxies its registry has forgotten
(silent for `forget_after`); another replica that still holds such a proxy stale forgets
it when the deletion comes through its watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from starmesh.reconciler.errors import InvalidRegistration, ReconcilerError, RegistryFull
from starmesh.reconciler.metrics import NO_METRICS, Metrics
from starmesh.reconciler.model import ProxyEntry
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout

__all__ = ["PROXIES_PREFIX", "RegistrationRecord", "RegistrySync", "SharedStore"]

log = logging.getLogger("starmesh.reconciler.registry_sync")

PROXIES_PREFIX = "proxies/"
MAX_BACKOFF = 5.0
"""The longest wait (seconds) between two tries at writing records while the store fails."""
LINGER = 0.02
"""Seconds the writer waits after the first record of a batch for more to join it."""
STOP_FLUSH = 2.0
"""Seconds `stop` lets the writer go on flushing queued records before it gives up."""
_FIRST_BACKOFF = 0.1


class RegistrationRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One proxy's registration as the replica it talks to shares it (`proxies/<id>`):
    the heartbeat's fields, its last ACK or NACK, when it was last in contact (`seen_at`,
    unix time) and which replica wrote it. Unknown fields are ignored, so a newer replica
    may add some."""

    id: str
    service: str
    version: str
    address: str
    release_version: int | None
    bundle: str | None
    error: str | None
    nacked_version: int | None
    nacked_bundle: str | None
    requests_total: int | None
    seen_at: float
    replica: str


class SharedStore(Protocol):
    """What RegistrySync needs of the store (etcd_store.EtcdStore has it): reads from the
    mirror, unfenced batch writes, and change callbacks on the store's thread."""

    def get(self, key: str) -> bytes | None: ...

    def keys(self, prefix: str) -> list[str]: ...

    def put_many(self, items: Mapping[str, bytes | None]) -> None: ...

    def subscribe(self, prefix: str, callback: Callable[[str, bytes | None], None]) -> None: ...


_Report = tuple[int | None, str | None, str | None, int | None, str | None]
_Content = tuple[str, str, str, int | None, str | None, str | None, int | None, str | None]


class RegistrySync:
    """Shares this replica's registrations and applies the others' (see the module docs)."""

    def __init__(
        self,
        store: SharedStore,
        registry: Registry,
        rollout: Rollout,
        replica_id: str,
        *,
        max_batch: int = 64,
        linger: float = LINGER,
        refresh: float | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        refresh = registry.ttl / 2 if refresh is None else refresh
        if max_batch < 1 or linger < 0 or not 0 <= refresh <= registry.ttl:
            raise ValueError(
                f"registry sync needs max_batch >= 1, linger >= 0 and 0 <= refresh <= the registry's ttl "
                f"(got max_batch={max_batch}, linger={linger}, refresh={refresh})"
            )
        self.store, self.registry, self.rollout = store, registry, rollout
        self.replica_id, self.max_batch, self.linger, self.refresh = replica_id, max_batch, linger, refresh
        self.metrics = metrics
        self.written = 0
        """Proxies' records put to the store so far (deletions not counted)."""
        self._queued: dict[str, tuple[_Content, float]] = {}  # proxy id -> last record queued: content, seen
        self._tidy_at = 64
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, bytes | None] = {}  # store key -> record (None: delete), oldest first
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_until = 0.0
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow `proxies/` (call on `loop`): subscribe, take in the records there now (oldest
        first), start the writer. Changes seen meanwhile arrive after, and older ones change nothing."""
        self._loop = loop
        self.store.subscribe(PROXIES_PREFIX, self._changed)
        records = [self._decode(key, self.store.get(key)) for key in self.store.keys(PROXIES_PREFIX)]
        for record in sorted((r for r in records if r is not None), key=lambda r: r.seen_at):
            self._apply(record)
        self._thread = threading.Thread(target=self._write_loop, name="starmesh-registry-sync", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop applying and writing; queued records are flushed for at most STOP_FLUSH s."""
        self._flush_until = time.monotonic() + STOP_FLUSH
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_FLUSH + 1.0)
            if self._thread.is_alive():
                log.warning("registrations: the writer did not stop within %.0f s (a store call hangs)", STOP_FLUSH)

    # -- out: this replica's proxies -----------------------------------------------------------

    def published(self, proxy_id: str) -> None:
        """The API was in contact with this proxy here (on the loop): queue its record when
        its content changed or the last one written is `refresh` s old (see the module docs)."""
        entry = self.registry.get(proxy_id)
        if entry is None or self._stopping.is_set():
            return
        key, content = PROXIES_PREFIX + proxy_id, _content(entry)
        last = self._queued.get(proxy_id)
        fresh = last is not None and last[0] == content and entry.seen - last[1] < self.refresh
        seen_at = time.time() - max(0.0, self.registry.clock() - entry.seen)
        with self._lock:
            if fresh and key not in self._pending:
                return  # nothing new to say, and said recently enough
            first = not self._pending
            self._pending.pop(key, None)  # to the back: newest last
            self._pending[key] = msgspec.json.encode(_record_of(entry, self.replica_id, seen_at))
            full = len(self._pending) >= self.max_batch
        self._queued[proxy_id] = (content, entry.seen)
        if len(self._queued) > self._tidy_at:
            self._tidy()
        if first or full:
            self._wake.set()

    def _tidy(self) -> None:
        """Drop what `published` remembers of proxies the registry forgot (amortized: when the
        memory has doubled since the last tidy)."""
        for proxy_id in [p for p in self._queued if self.registry.get(p) is None]:
            del self._queued[proxy_id]
        self._tidy_at = 2 * len(self._queued) + 64

    def prune(self) -> None:
        """Leader: delete the records of proxies the registry has forgotten. Quick (the
        writer deletes them); from another thread it hands over to the loop."""
        loop = self._loop
        if loop is not None and _running_loop() is not loop:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to prune for
                loop.call_soon_threadsafe(self._prune)
            return
        self._prune()

    def _prune(self) -> None:
        known = {PROXIES_PREFIX + entry.id for entry in self.registry.entries()}
        gone = [key for key in self.store.keys(PROXIES_PREFIX) if key not in known]
        if not gone:
            return
        with self._lock:
            for key in gone:
                self._pending.setdefault(key, None)  # a queued record is newer news: it stays
        self._wake.set()

    def _write_loop(self) -> None:
        failing, attempt = False, 0
        while True:
            self._wake.wait()
            self._wake.clear()
            self._linger()
            while batch := self._take():
                if self._stopping.is_set() and time.monotonic() > self._flush_until:
                    return
                try:
                    self.store.put_many(batch)
                except Exception as exc:  # StoreError above all; anything else must not kill the writer
                    self._give_back(batch)
                    if not failing:
                        log.warning("registrations: cannot write proxies' records, kept and retried: %s", exc)
                    failing, attempt = True, attempt + 1
                    delay = min(MAX_BACKOFF, _FIRST_BACKOFF * 2 ** min(attempt, 16))
                    if self._stopping.wait(random.uniform(delay / 2, delay)):
                        return
                    continue
                self._count(sum(value is not None for value in batch.values()))
                if failing:
                    log.warning("registrations: writing proxies' records again")
                failing, attempt = False, 0
            if self._stopping.is_set():
                return

    def _linger(self) -> None:
        """Wait up to `linger` s for more records to join the first, unless a batch fills."""
        deadline = time.monotonic() + self.linger
        while not self._stopping.is_set():
            with self._lock:
                if len(self._pending) >= self.max_batch:
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()

    def _count(self, records: int) -> None:
        with self._lock:
            self.written += records
        if records:
            self.metrics.registrations_written(records)

    def _take(self) -> dict[str, bytes | None]:
        with self._lock:
            keys = list(itertools.islice(self._pending, self.max_batch))
            return {key: self._pending.pop(key) for key in keys}

    def _give_back(self, batch: dict[str, bytes | None]) -> None:
        with self._lock:
            for key, value in batch.items():
                self._pending.setdefault(key, value)  # a record queued meanwhile is newer

    # -- in: the other replicas' proxies -------------------------------------------------------

    def _changed(self, key: str, value: bytes | None) -> None:
        """The watch (on the store's thread): decode here, apply on the loop."""
        loop = self._loop
        if loop is None or self._stopping.is_set() or not key.startswith(PROXIES_PREFIX):
            return
        record = None if value is None else self._decode(key, value)
        if value is not None and (record is None or record.replica == self.replica_id):
            return  # not a record, or our own back from the watch (applied first-hand already)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
            if record is None:
                loop.call_soon_threadsafe(self._deleted, key[len(PROXIES_PREFIX) :])
            else:
                loop.call_soon_threadsafe(self._apply, record)

    def _apply(self, record: RegistrationRecord) -> None:
        if self._stopping.is_set():
            return
        before = self.registry.get(record.id)
        try:
            applied = self.registry.apply(
                record.id, record.service, record.version, record.address,
                release_version=record.release_version, bundle=record.bundle, error=record.error,
                nacked_version=record.nacked_version, nacked_bundle=record.nacked_bundle,
                requests_total=record.requests_total, seen_ago=time.time() - record.seen_at,
            )  # fmt: skip
        except (InvalidRegistration, RegistryFull) as exc:
            log.warning("registrations: record of proxy %s from replica %s not taken in: %s",
                        record.id, record.replica, exc)  # fmt: skip
            return
        if applied:
            self._queued.pop(record.id, None)  # another replica spoke for it: the next contact here writes
        after = self.registry.get(record.id)
        if not applied or after is None or _report(after) == _report(before):
            return
        try:
            if after.error is None:
                self.rollout.on_report(after.id, after.release_version, after.bundle, None)
            else:
                self.rollout.on_report(after.id, after.nacked_version, after.nacked_bundle, after.error)
        except ReconcilerError as exc:  # the leader's store write failed: its next tick saves again
            log.error("registrations: the report of proxy %s (via replica %s) reached the rollout "
                      "but could not be saved: %s", record.id, record.replica, exc)  # fmt: skip

    def _deleted(self, proxy_id: str) -> None:
        self._queued.pop(proxy_id, None)
        entry = self.registry.get(proxy_id)
        if entry is not None and entry.stale:  # a live one was in contact since: it stays
            self.registry.forget(proxy_id)

    def _decode(self, key: str, value: bytes | None) -> RegistrationRecord | None:
        if value is None:
            return None
        try:
            record = msgspec.json.decode(value, type=RegistrationRecord)
        except msgspec.MsgspecError as exc:
            log.warning("registrations: %s does not hold a proxy record (ignored): %s", key, exc)
            return None
        if PROXIES_PREFIX + record.id != key:
            log.warning("registrations: %s holds the record of proxy %r (ignored)", key, record.id[:140])
            return None
        return record


def _record_of(entry: ProxyEntry, replica: str, seen_at: float) -> RegistrationRecord:
    # the count travels only when this contact carried it (a heartbeat with requests_total)
    counted = entry.requests[-1][0] if entry.requests and entry.requests[-1][1] == entry.seen else None
    return RegistrationRecord(
        entry.id, entry.service, entry.version, entry.address, entry.release_version, entry.bundle, entry.error,
        entry.nacked_version, entry.nacked_bundle, counted, seen_at, replica,
    )  # fmt: skip


def _content(entry: ProxyEntry) -> _Content:
    """What a record says of a proxy, its age and request count aside: a change is written at once."""
    return (
        entry.service, entry.version, entry.address, entry.release_version, entry.bundle, entry.error,
        entry.nacked_version, entry.nacked_bundle,
    )  # fmt: skip


def _report(entry: ProxyEntry | None) -> _Report:
    """What an entry says of the proxy's ACKs and NACKs (all None for no entry)."""
    if entry is None:
        return None, None, None, None, None
    return entry.release_version, entry.bundle, entry.error, entry.nacked_version, entry.nacked_bundle


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
