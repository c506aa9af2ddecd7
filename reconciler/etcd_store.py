"""The control plane's Store on etcd: reads from a local mirror, writes as etcd transactions.

    start()  full read of the prefix ─► Mirror ◄─ watch from the read's revision + 1
    get/keys/meta                       the mirror (never blocks on etcd; still answers while
                                        etcd is down, so the API keeps serving read-only)
    put/compare_and_put/delete/...      one txn each, then the mirror at the txn's revision
    fenced(fence)                       the same writes, each also requiring the `leader`
                                        key's create_revision to be `fence()` (else NotLeader)
    probe thread                        every probe_interval writes probes/<store id> on a
                                        short lease and expects it back through the watch

A value longer than `chunk_size` is stored as parts under `chunks/` and a pointer at its
key (etcd_chunks.py): reads put it together again, `keys()` never lists the parts, and
subscribers hear of the key once, when its pointer lands. With `tls` (EtcdTLS) every
call and every watch go over HTTPS with a client certificate (etcd_client.py).

etcd3gw's watch thread cannot tell when its stream breaks, so liveness is checked end to
end: a probe not seen through the watch within 3 intervals (a broken stream, a compacted
start revision) makes the store read the prefix again and start a new watch. A probe
write that fails marks the store unavailable (`health()`); the next one that works marks
it available and resyncs, telling subscribers about everything that changed meanwhile.

Every call is blocking HTTP through `EtcdConnection` (failover between members): call
the writes from worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

from starmesh.reconciler.errors import NotLeader, StoreError, StoreUnavailable
from starmesh.reconciler.etcd_chunks import CHUNKS_PREFIX, DEFAULT_CHUNK_SIZE, ChunkedValues, encode_value, split
from starmesh.reconciler.etcd_client import EtcdConnection, EtcdTLS, EtcdURL
from starmesh.reconciler.etcd_mirror import KeyMeta, Listener, Mirror, MirrorFeed, b64, decode_kv
from starmesh.reconciler.model import utc_now
from starmesh.reconciler.store import Store, StoreHealth

__all__ = ["PROBES_PREFIX", "EtcdStore", "KeyMeta"]

PROBES_PREFIX = "probes/"
"""Where each store writes its liveness probe; kept out of the mirror."""

log = logging.getLogger("starmesh.control_plane.store")

_LEADER = "leader"  # election.py's LEADER_KEY: the fence is its create_revision
_KEY = re.compile(r"^[A-Za-z0-9._:-]+(/[A-Za-z0-9._:-]+)*$")
_BATCH = 64
"""Operations per transaction in put_many (etcd's default limit is 128)."""
_T = TypeVar("_T")
_ANY = object()  # compare_and_put's `expected` when there is nothing to compare


def check_key(key: str) -> str:
    if len(key) > 512 or not _KEY.fullmatch(key):
        raise StoreError(f"invalid store key {key!r} (letters, digits, ._:- in /-separated names, at most 512)")
    if key.startswith(CHUNKS_PREFIX):
        raise StoreError(f"invalid store key {key!r}: {CHUNKS_PREFIX} holds the parts of large values")
    return key


class EtcdStore:
    """A Store on etcd shared by every replica (see the module docstring)."""

    def __init__(
        self,
        url: EtcdURL,
        *,
        timeout: float = 5.0,
        probe_interval: float = 1.0,
        sync_timeout: float = 30.0,
        tls: EtcdTLS | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.url = url
        self.id = secrets.token_hex(6)
        self.probe_interval = probe_interval
        self.sync_timeout = sync_timeout
        self._connection = EtcdConnection(url, timeout=timeout, tls=tls)
        self._prefix = url.prefix
        self._mirror = Mirror()
        self._values = ChunkedValues(self._mirror.get, chunk_size)
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None
        self._feed = MirrorFeed(self._connection, self._mirror, hidden=PROBES_PREFIX)
        # health
        self._health_lock = threading.Lock()
        self._available = True
        self._since: str | None = None
        self._error: str | None = None
        # the probe's own lease and progress
        self._probe_lock = threading.Lock()  # the probe thread and wait_synced
        self._probe_lease: int | None = None
        self._probe_lease_ttl = max(5, math.ceil(10 * probe_interval))
        self._probe_refreshed = 0.0
        self._probe_count = 0
        self._pending: tuple[int, float] | None = None  # oldest probe not seen back: revision, when

    @staticmethod
    def tls_from(ca: str | None, cert: str | None, key: str | None) -> EtcdTLS | None:
        """`--store-ca`, `--store-cert`, `--store-key` as EtcdTLS; None (plain HTTP) without any."""
        return None if ca is None and cert is None and key is None else EtcdTLS(ca, cert, key)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Read the prefix into the mirror and start the watch and the probe (blocking).

        StoreUnavailable when etcd cannot be read within `sync_timeout` seconds."""
        self._mirror.start()
        deadline = time.monotonic() + self.sync_timeout
        while True:
            try:
                self._resync()
                self._set_available(True, None)
                break
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline or self._stop.is_set():
                    self.close()
                    raise StoreUnavailable(f"cannot read {self.url} within {self.sync_timeout:g}s: {exc}") from exc
                self._stop.wait(min(0.2, self.probe_interval))
        self._probe = threading.Thread(target=self._probe_loop, name=f"etcd-store-probe-{self.id}", daemon=True)
        self._probe.start()

    def close(self) -> None:
        """Stop the probe and the watch, deliver what subscribers have queued, close connections."""
        self._stop.set()
        if self._probe is not None and self._probe is not threading.current_thread():
            self._probe.join()
        self._probe = None
        self._feed.stop()
        self._mirror.close()
        self._connection.close()

    # -- reads (the mirror) --------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The value (StoreError when its parts are missing or altered)."""
        meta = self._mirror.get(check_key(key))
        return None if meta is None else self._values.decode(key, meta)

    def keys(self, prefix: str) -> list[str]:
        if prefix and not prefix.endswith("/"):
            raise StoreError(f"invalid store folder {prefix!r} (a folder name ends with /)")
        if prefix:
            check_key(prefix[:-1])
        return self._mirror.keys(prefix)

    def meta(self, key: str) -> KeyMeta | None:
        meta = self._mirror.get(check_key(key))
        return None if meta is None else replace(meta, value=self._values.decode(key, meta))

    def subscribe(self, prefix: str, callback: Listener) -> None:
        """`callback(key, value or None)` after every mirror change under `prefix`, own writes
        included, once each, in the order the mirror took them (for one key: revision order),
        on the store's dispatcher thread: hand work over (call_soon_threadsafe), return fast.
        A large value's parts are not changes: its key is reported once, with the whole value."""
        self._mirror.subscribe(prefix, self._values.listener(callback))

    # -- writes --------------------------------------------------------------------

    def put(self, key: str, value: bytes) -> None:
        self._put(key, value)

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes) -> bool:
        return self._put(key, value, expected=expected) is not None

    def delete(self, key: str) -> None:
        self._delete(key)

    def fenced(self, fence: Callable[[], int | None]) -> Store:
        """A view whose writes succeed only while the `leader` key is the one `fence()` names."""
        return FencedStore(self, fence)

    def put_leased(self, key: str, value: bytes, lease: int) -> None:
        self._put(key, value, lease=lease)

    def create_leased(self, key: str, value: bytes, lease: int) -> int | None:
        """Create `key` on `lease` unless it exists; its create_revision, or None when it existed."""
        return self._put(key, value, lease=lease, expected=None)

    def put_many(self, items: Mapping[str, bytes | None]) -> None:
        """Write (bytes) or delete (None) many keys, up to 64 to a transaction (not fenced);
        a large value, or deleting one, takes transactions of its own."""
        pending = []
        for key, value in items.items():
            if value is None and self._values.has_parts(check_key(key)):
                self._delete(key)
            elif value is not None and (len(value) > self._values.chunk_size or self._values.has_parts(check_key(key))):
                self._put(key, value)
            else:
                pending.append((key, None if value is None else encode_value(value)))
        for start in range(0, len(pending), _BATCH):
            batch = pending[start : start + _BATCH]
            ops = [
                {"request_put": {"key": b64(self._prefix + k), "value": b64(v), "prev_kv": True}}
                if v is not None
                else {"request_delete_range": {"key": b64(self._prefix + k)}}
                for k, v in batch
            ]
            answer = self._txn([], ops, [], f"write {len(batch)} keys")
            revision = int(answer["header"]["revision"])
            for (key, value), response in zip(batch, answer.get("responses", []), strict=False):
                self._applied(key, value, revision, response, 0)

    # -- leases --------------------------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        return self._call(lambda c: c.lease(ttl).id, f"grant a {ttl}s lease")

    def keepalive(self, lease: int) -> bool:
        """Refresh the lease; False when it has expired (or was revoked)."""
        return self._call(lambda c: Lease(lease, c).refresh() > 0, f"keep lease {lease:x} alive")

    def revoke(self, lease: int) -> None:
        """Revoke the lease (its keys go at once, in the mirror too); no error if it is gone."""

        def revoke(client: Etcd3Client) -> dict[str, Any]:
            answer: dict[str, Any] = client.post(client.get_url("/kv/lease/revoke"), json={"ID": lease})
            return answer

        try:
            answer = self._call(revoke, f"revoke lease {lease:x}")
        except StoreError as exc:
            if "lease not found" in str(exc):
                return
            raise
        self._mirror.drop_lease(lease, int(answer["header"]["revision"]))

    # -- health --------------------------------------------------------------------

    def health(self) -> StoreHealth:
        """Unavailable (read-only) from the first call etcd did not answer until a probe works."""
        with self._health_lock:
            available, since, error = self._available, self._since, self._error
        revision = max(self._mirror.revision, self._feed.watched)
        return StoreHealth("etcd", available, since, error, self._connection.member, revision or None)

    def wait_synced(self, timeout: float) -> bool:
        """Whether a probe written now comes back through the watch within `timeout` seconds
        (then the mirror holds everything written before it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                revision = self._write_probe()
            except StoreError:
                revision = None
            wait = max(0.0, min(deadline - time.monotonic(), 3 * self.probe_interval))
            if revision is not None and self._feed.wait_for(revision, wait):
                return True
            if time.monotonic() >= deadline:
                return False
            self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- the transaction behind every write ----------------------------------------

    def _put(
        self, key: str, value: bytes, *, lease: int = 0, expected: object = _ANY, fence: int | None = None
    ) -> int | None:
        """Write `key`; its revision, or None when `expected` did not match (NotLeader: the fence).
        A value past chunk_size: its parts first, then the pointer, which also deletes the
        key's other parts (as does any write over a pointer)."""
        full = b64(self._prefix + check_key(key))
        raw, keep = encode_value(value), None
        if len(value) > self._values.chunk_size:
            pointer, parts = split(key, value, self._values.chunk_size)
            raw, keep = pointer.encode(), pointer.tag
            for number, (name, part) in enumerate(parts):
                self._put_part(key, name, part, f"{number + 1} of {len(parts)}", lease=lease, fence=fence)
        compares: list[dict[str, Any]] = []
        failure: list[dict[str, Any]] = []
        if fence is not None:
            compares.append(_fence_compare(self._prefix, fence))
            failure.append({"request_range": {"key": b64(self._prefix + _LEADER)}})
        if expected is not _ANY:
            if expected is None:
                compares.append({"key": full, "target": "CREATE", "result": "EQUAL", "create_revision": 0})
            else:
                assert isinstance(expected, bytes)
                stored = b64(self._values.stored(key, expected))
                compares.append({"key": full, "target": "VALUE", "result": "EQUAL", "value": stored})
            failure.append({"request_range": {"key": full}})
        put: dict[str, Any] = {"key": full, "value": b64(raw), "prev_kv": True}
        if lease:
            put["lease"] = lease
        success = [{"request_put": put}]
        if keep is not None or self._values.has_parts(key):
            success += self._values.delete_ops(self._prefix, key, keep)
        answer = self._txn(compares, success, failure, f"put {key}")
        revision = int(answer["header"]["revision"])
        if answer.get("succeeded"):
            self._applied(key, raw, revision, answer["responses"][0], lease)
            return revision
        self._refused(key, answer, revision, fence)
        return None

    def _delete(self, key: str, fence: int | None = None) -> None:
        full = b64(self._prefix + check_key(key))
        compares = [] if fence is None else [_fence_compare(self._prefix, fence)]
        failure = [] if fence is None else [{"request_range": {"key": b64(self._prefix + _LEADER)}}]
        success = [{"request_delete_range": {"key": full}}, *self._values.delete_ops(self._prefix, key, None)]
        answer = self._txn(compares, success, failure, f"delete {key}")
        revision = int(answer["header"]["revision"])
        if not answer.get("succeeded"):
            self._refused(key, answer, revision, fence)
        self._mirror.apply(key, None, revision)

    def _put_part(self, key: str, name: str, part: bytes, which: str, *, lease: int, fence: int | None) -> None:
        put: dict[str, Any] = {"key": b64(self._prefix + name), "value": b64(part), "prev_kv": True}
        if lease:
            put["lease"] = lease
        compares = [] if fence is None else [_fence_compare(self._prefix, fence)]
        answer = self._txn(compares, [{"request_put": put}], [], f"put {key} (part {which})")
        if not answer.get("succeeded"):
            raise NotLeader(f"write to {key} refused: this replica is no longer the leader (leader key changed)")
        self._applied(name, part, int(answer["header"]["revision"]), answer["responses"][0], lease)

    def _txn(
        self, compares: list[dict[str, Any]], success: list[dict[str, Any]], failure: list[dict[str, Any]], what: str
    ) -> dict[str, Any]:
        payload = {"compare": compares, "success": success, "failure": failure}
        return dict(self._call(lambda c: c.transaction(payload), what))

    def _applied(self, key: str, value: bytes | None, revision: int, response: Mapping[str, Any], lease: int) -> None:
        if value is None:
            self._mirror.apply(key, None, revision)
            return
        previous = response.get("response_put", {}).get("prev_kv")
        created = int(previous["create_revision"]) if previous else revision
        self._mirror.apply(key, KeyMeta(value, created, revision, lease), revision)

    def _refused(self, key: str, answer: Mapping[str, Any], revision: int, fence: int | None) -> None:
        """A txn whose compare failed: NotLeader when the fence did; else the key's current
        state (the failure branch read it) goes into the mirror, so a retry reads it."""
        responses = list(answer.get("responses", []))
        if fence is not None:
            kvs = responses.pop(0).get("response_range", {}).get("kvs", [])
            holder = decode_kv(kvs[0])[1].create_revision if kvs else 0
            if holder != fence or not responses:  # not responses: only the fence was compared
                raise NotLeader(f"write to {key} refused: this replica is no longer the leader (leader key changed)")
        kvs = responses[0].get("response_range", {}).get("kvs", [])
        if kvs:
            meta = decode_kv(kvs[0])[1]
            self._mirror.apply(key, meta, meta.mod_revision)
        else:
            self._mirror.apply(key, None, revision)

    def _call(self, fn: Callable[[Etcd3Client], _T], what: str) -> _T:
        try:
            return self._connection.call(fn, what)
        except StoreUnavailable as exc:
            self._set_available(False, str(exc))
            raise

    # -- watch, probe, resync ------------------------------------------------------

    def _resync(self) -> None:
        try:
            self._feed.resync()
        except StoreUnavailable as exc:
            self._set_available(False, str(exc))
            raise
        with self._health_lock:
            self._pending = None

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_interval):
            try:
                self._probe_once()
            except StoreError:
                pass  # marked unavailable by _call; the next probe tries again
            except Exception:  # the probe must outlive any surprise
                log.exception("etcd store probe failed")

    def _probe_once(self) -> None:
        revision = self._write_probe()
        if not self._available:
            self._resync()
            self._set_available(True, None)
            return
        now = time.monotonic()
        watched = self._feed.watched
        with self._health_lock:
            if self._pending is not None and watched >= self._pending[0]:
                self._pending = None
            if self._pending is None:
                if watched < revision:
                    self._pending = (revision, now)
                return
            stalled = now - self._pending[1] >= 3 * self.probe_interval
        if stalled:
            self._resync()

    def _write_probe(self) -> int:
        """Write probes/<id> on the probe's lease (granted or renewed as needed); its revision."""
        with self._probe_lock:
            now = time.monotonic()
            if self._probe_lease is None or now - self._probe_refreshed >= self._probe_lease_ttl / 3:
                if self._probe_lease is None or not self.keepalive(self._probe_lease):
                    self._probe_lease = self.grant_lease(self._probe_lease_ttl)
                self._probe_refreshed = now
            self._probe_count += 1
            put = {
                "key": b64(self._prefix + PROBES_PREFIX + self.id),
                "value": b64(str(self._probe_count)),
                "lease": self._probe_lease,
            }
            try:
                answer = self._txn([], [{"request_put": put}], [], "write the liveness probe")
            except StoreUnavailable:
                raise
            except StoreError:
                self._probe_lease = None  # "lease not found": the next probe takes a new one
                raise
            return int(answer["header"]["revision"])

    def _set_available(self, available: bool, error: str | None) -> None:
        with self._health_lock:
            if available == self._available:
                if error is not None:
                    self._error = error
                return
            self._available = available
            self._since = None if available else utc_now()
            self._error = error


class FencedStore:
    """EtcdStore writes that also require this replica to hold the leader key (see fenced())."""

    def __init__(self, store: EtcdStore, fence: Callable[[], int | None]) -> None:
        self._store = store
        self._fence = fence

    def _current(self, key: str) -> int:
        fence = self._fence()
        if fence is None:
            raise NotLeader(f"write to {key} refused: this replica is no longer the leader")
        return fence

    def get(self, key: str) -> bytes | None:
        return self._store.get(key)

    def keys(self, prefix: str) -> list[str]:
        return self._store.keys(prefix)

    def health(self) -> StoreHealth:
        return self._store.health()

    def put(self, key: str, value: bytes) -> None:
        self._store._put(key, value, fence=self._current(key))

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes) -> bool:
        return self._store._put(key, value, expected=expected, fence=self._current(key)) is not None

    def delete(self, key: str) -> None:
        self._store._delete(key, fence=self._current(key))


def _fence_compare(prefix: str, fence: int) -> dict[str, Any]:
    return {"key": b64(prefix + _LEADER), "target": "CREATE", "result": "EQUAL", "create_revision": fence}
