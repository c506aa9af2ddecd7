"""Which control-plane replicas are up: each one keeps `replicas/<id>` alive on its own lease.

    replica r1 ── put_leased("replicas/r1", {...}, lease) ──┐ every ttl/3: keepalive, then
    replica r2 ── put_leased("replicas/r2", {...}, lease) ──┤ rewrite (role and seen_at fresh)
                                                              ▼
                                         etcd ─watch─► every replica's mirror ─► replicas()

A replica that stops cleanly (`leave`) revokes its lease, so its record goes at once; one
that crashes stops renewing, and etcd deletes the record when the lease runs out (ttl
seconds later). No replica ever deletes another's record: the leases are the truth.
`/v1/status` shows the list under `control_plane.replicas`.

The record says what the replica is (`id`, `url`, `started_at`), what it releases (`key`:
the id of its signing key, as DSSE signatures carry it; `repo` and `branch`: the policy it
follows) and what it last said about itself (`role`, `seen_at`); `seen_at` is the
replica's own clock, a hint for people, never a liveness test (the lease is). `/v1/status`
adds `seen_seconds_ago` by the answering replica's clock (`to_json(now=...)`); it is never
stored.

Replicas that disagree. Every replica must sign with the same key and follow the same
repository and branch: after a failover the new leader signs and releases, and a proxy
that trusts only the old key NACKs everything, or the mesh jumps to another policy.
Nothing can stop a replica started with other flags, so each one compares its own record
with every live replica's (at each refresh, and when asked) and says so: `problems()`
lists each difference (in `/v1/status` under `control_plane.problems`) and each new one
is logged once, as an error. A record without these fields (an older replica) is not
compared. This module also holds what the election shares: the checks of a replica id
and of a lease ttl (whole seconds), the state both keep (`LeasedPart`), and the lease
chores (`pause`, `revoke_quietly`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from starmesh.reconciler.errors import StoreError
from starmesh.reconciler.model import utc_now
from starmesh.reconciler.watch import backoff_delay

if TYPE_CHECKING:
    from starmesh.reconciler.etcd_store import EtcdStore

__all__ = ["REPLICAS_PREFIX", "LeasedPart", "ReplicaInfo", "ReplicaSet", "check_replica_id", "lease_seconds"]

log = logging.getLogger("starmesh.control_plane.replicas")

REPLICAS_PREFIX = "replicas/"
RETRY_BASE = 0.1
"""Seconds before the first retry after a failed etcd call; doubles (jittered) up to ttl/3."""

_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_replica_id(replica_id: str) -> str:
    """`replica_id` when it is 1-64 of A-Z a-z 0-9 . _ - (it names a store key); ValueError otherwise."""
    if not _REPLICA_ID.fullmatch(replica_id):
        raise ValueError(
            f"invalid replica id {replica_id!r}: use 1 to 64 letters, digits, '.', '_' or '-' (e.g. cp-1)"
        )
    return replica_id


def lease_seconds(ttl: float) -> int:
    """An etcd lease ttl: `ttl` seconds rounded up to a whole second (etcd counts in seconds)."""
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"invalid lease ttl {ttl!r}: give a positive number of seconds (e.g. 10)")
    return max(1, math.ceil(ttl))


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica's record under `replicas/<id>` (what `/v1/status` lists)."""

    id: str
    url: str
    role: str
    started_at: str
    seen_at: str
    key: str | None = None  # the signing key's id (None: an older replica's record)
    repo: str | None = None
    branch: str | None = None

    def to_json(self, *, now: float | None = None) -> dict[str, object]:
        """The record as stored; with `now` (unix time, the answering replica's clock) also
        `seen_seconds_ago`, for `/v1/status`."""
        data: dict[str, object] = {
            "id": self.id, "url": self.url, "role": self.role, "started_at": self.started_at, "seen_at": self.seen_at,
            "key": self.key, "repo": self.repo, "branch": self.branch,
        }  # fmt: skip
        if now is not None:
            data["seen_seconds_ago"] = _seconds_ago(self.seen_at, now)
        return data


def decode_replica(value: bytes | None) -> ReplicaInfo | None:
    """The record in `value`, or None when it is not one (absent, not JSON, a field missing or not text)."""
    if value is None:
        return None
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    fields = ("id", "url", "role", "started_at", "seen_at")
    if not isinstance(data, dict) or not all(isinstance(data.get(name), str) for name in fields):
        return None
    key, repo, branch = (data.get(name) for name in ("key", "repo", "branch"))
    replica_id, url, role, started_at, seen_at = (str(data[name]) for name in fields)
    return ReplicaInfo(
        replica_id, url, role, started_at, seen_at,
        key=key if isinstance(key, str) else None,
        repo=repo if isinstance(repo, str) else None,
        branch=branch if isinstance(branch, str) else None,
    )  # fmt: skip


def _seconds_ago(stamp: str, now: float) -> float | None:
    """How long before `now` the RFC 3339 `stamp` was (>= 0), None when it does not parse."""
    try:
        then = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None
    return round(max(0.0, now - then), 3)


class LeasedPart:
    """What a replica's record (`ReplicaSet`) and its election (election.py) have alike: who
    the replica is (a checked `replica_id`, its `url`), a lease `ttl` in whole seconds, the
    store, and `_wake`, which etcd's watch thread or any caller sets through `_wake_soon`
    to cut short the part's `pause` on the loop that runs it (`_loop`, set by `run`)."""

    def __init__(self, store: EtcdStore, replica_id: str, url: str, ttl: float) -> None:
        self.replica_id = check_replica_id(replica_id)
        self.url = url
        self.ttl = lease_seconds(ttl)
        self._store = store
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random()

    def _wake_soon(self) -> None:
        """Set `_wake` from any thread; nothing before `run` (no loop yet) or after the loop
        closed, since nobody waits then."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)


class ReplicaSet(LeasedPart):
    """This replica's own record, kept alive on its lease, and everyone's records from the mirror."""

    def __init__(
        self,
        store: EtcdStore,
        replica_id: str,
        url: str,
        *,
        ttl: float = 10.0,
        role: Callable[[], str] = lambda: "follower",
        key: str | None = None,
        repo: str | None = None,
        branch: str | None = None,
    ) -> None:
        super().__init__(store, replica_id, url, ttl)
        self.signing_key, self.repo, self.branch = key, repo, branch
        self._told: set[str] = set()  # the problems logged, so each is logged once
        self.key = REPLICAS_PREFIX + replica_id
        self.started_at = utc_now()
        self._role = role
        self._every = self.ttl / 3
        self._lease: int | None = None
        self._left = False

    async def run(self, stop: asyncio.Event) -> None:
        """Write the record and rewrite it every ttl/3 until `stop` (or `leave`); etcd
        failures are logged and retried with backoff, never raised."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not stop.is_set() and not self._left:
            self._wake.clear()
            try:
                await self._announce()
            except StoreError as exc:
                failures += 1
                if failures == 1:
                    log.warning("replica %s cannot renew its record (retrying): %s", self.replica_id, exc)
                delay = backoff_delay(failures - 1, RETRY_BASE, self._every, self._rng)
            else:
                if failures:
                    log.info("replica %s renews its record again", self.replica_id)
                failures, delay = 0, self._every
            self.problems()  # logs the differences that are new
            await pause(stop, self._wake, delay)

    def refresh(self) -> None:
        """Rewrite the record now rather than at the next tick (the role changed); any thread."""
        self._wake_soon()

    def replicas(self) -> list[ReplicaInfo]:
        """Every live replica's record (from the mirror), sorted by id; records that do
        not decode, or sit under another id's key, are skipped."""
        found: list[ReplicaInfo] = []
        for key in self._store.keys(REPLICAS_PREFIX):
            info = decode_replica(self._store.get(key))
            if info is not None and REPLICAS_PREFIX + info.id == key:
                found.append(info)
        return sorted(found, key=lambda info: info.id)

    def problems(self) -> list[str]:
        """How the other live replicas differ from this one in signing key, repository or
        branch, one sentence each (see the module docs); each new one is logged once."""
        found: list[str] = []
        for other in self.replicas():
            if other.id == self.replica_id:
                continue
            if None not in (other.key, self.signing_key) and other.key != self.signing_key:
                found.append(
                    f"replica {other.id} signs with key {other.key}, this one ({self.replica_id}) with "
                    f"{self.signing_key}: proxies trusting only one key will NACK releases after a failover"
                )
            ours, theirs = (self.repo, self.branch), (other.repo, other.branch)
            if None not in (*ours, *theirs) and ours != theirs:
                found.append(
                    f"replica {other.id} follows {other.repo} branch {other.branch}, this one ({self.replica_id}) "
                    f"{self.repo} branch {self.branch}: a failover would release another policy"
                )
        for problem in found:
            if problem not in self._told:
                log.error("%s", problem)
        self._told = set(found)  # a difference that went and came back is logged again
        return found

    async def leave(self) -> None:
        """Clean stop: revoke the lease (etcd deletes the record at once) and stop `run`.
        When etcd cannot be reached the record goes when the lease runs out."""
        self._left = True
        self._wake.set()
        lease, self._lease = self._lease, None
        if lease is not None:
            await revoke_quietly(self._store, lease, f"replica {self.replica_id}")

    async def _announce(self) -> None:
        lease = self._lease
        if lease is not None and not await asyncio.to_thread(self._store.keepalive, lease):
            log.info("replica %s: its lease expired; writing its record again on a new one", self.replica_id)
            self._lease = lease = None
        if lease is None:
            lease = await asyncio.to_thread(self._store.grant_lease, self.ttl)
            if self._left:  # leave() ran meanwhile: it could not revoke this one
                await revoke_quietly(self._store, lease, f"replica {self.replica_id}")
                return
            self._lease = lease
        record = ReplicaInfo(
            self.replica_id, self.url, self._role(), self.started_at, utc_now(), self.signing_key, self.repo, self.branch
        )
        value = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":")).encode()
        await asyncio.to_thread(self._store.put_leased, self.key, value, lease)


async def pause(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or less when `stop` or `wake` is set; True when `wake` ended it
    (election.py waits the same way)."""
    if stop.is_set() or wake.is_set():
        return wake.is_set()
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return wake.is_set()


async def revoke_quietly(store: EtcdStore, lease: int, whose: str, logger: logging.Logger = log) -> None:
    """Revoke `lease`; when etcd cannot be reached, log it: the lease runs out by itself
    (election.py gives up its leases the same way)."""
    try:
        await asyncio.to_thread(store.revoke, lease)
    except StoreError as exc:
        logger.warning("%s: cannot revoke lease %x, it will expire by itself: %s", whose, lease, exc)
