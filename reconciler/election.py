"""Which replica leads: whoever holds the `leader` key, created on its own etcd lease.

    campaign   grant a lease (ttl s) ─► create_leased("leader", {id, url, since}, lease)
                 ├─ created: lead; the fence is the key's create_revision
                 └─ exists:  follow; campaign again when the key goes (watch) or after ttl/2
    lead       keepalive every renew_every s (a worker thread); step down when
                 · no keepalive has worked for valid_for s      (etcd out of reach)
                 · keepalive says the lease expired             (etcd deleted the key)
                 · the mirror shows the key gone or re-created  (someone else leads)
    resign     stop acting, delete the key if it is still ours, revoke the lease:
               another replica takes over at once instead of after ttl

Timing. etcd drops the key `ttl` seconds after the last keepalive it received; this
replica counts from *before* it sent that keepalive (or the grant), so its count runs
ahead of etcd's. It acts as leader (`fence()` answers) only for `valid_for = ttl - margin`
seconds after the last keepalive that worked, with margin = max(ttl/3, min(1 s, ttl/2)):
at ttl 10, 6.7 s; at ttl 2, 1 s. So a leader cut off from etcd stops acting at least a
margin before any other replica can be elected, and the margin absorbs a slow event
loop or a write already under way. It renews every valid_for/3 (at least as often as
ttl/3), so two keepalives in a row may fail before it steps down. Writes are safe even
beyond that: the Ledger writes through `store.fenced(election.fence)`, which etcd
refuses once the key's create_revision is not this replica's.

A replica that stepped down campaigns again at once, with a new lease. A replica that
restarts under the same id waits for its old key to expire: it cannot tell its own old
lease from another process using the same id by mistake. etcd failures never end `run`;
it backs off (jittered, at most ttl/2 between campaigns) and goes on. `on_change(leading)`
runs on the event loop, once per change of role; each change is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from starmesh.reconciler.errors import NotLeader, StoreError
from starmesh.reconciler.model import utc_now
from starmesh.reconciler.replicas import LeasedPart, pause, revoke_quietly
from starmesh.reconciler.watch import backoff_delay

if TYPE_CHECKING:
    from starmesh.reconciler.etcd_store import EtcdStore

__all__ = ["LEADER_KEY", "LeaderElection", "LeaderInfo"]

log = logging.getLogger("starmesh.control_plane.election")

LEADER_KEY = "leader"
RETRY_BASE = 0.1
"""Seconds before the first retry after a failed etcd call; doubles (jittered) up to a cap."""


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads, as the `leader` key says; `fence` is the key's create_revision."""

    id: str
    url: str
    since: str
    fence: int

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "url": self.url, "since": self.since}


def decode_leader(value: bytes, fence: int) -> LeaderInfo | None:
    """The leader in `value`, or None when it is not a leader record."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(name), str) for name in ("id", "url", "since")):
        return None
    return LeaderInfo(str(data["id"]), str(data["url"]), str(data["since"]), fence)


@dataclass(frozen=True)
class _Term:
    """This replica's leadership: its lease, its fence, and when the lease was last renewed
    (the clock just before the call that renewed it was sent)."""

    lease: int
    fence: int
    renewed: float


class LeaderElection(LeasedPart):
    """Campaign for the `leader` key, keep it while the lease lives, step down in time."""

    def __init__(
        self,
        store: EtcdStore,
        replica_id: str,
        url: str,
        *,
        ttl: float = 10.0,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(store, replica_id, url, ttl)
        margin = max(self.ttl / 3, min(1.0, self.ttl / 2))
        self.valid_for = self.ttl - margin
        self.renew_every = self.valid_for / 3
        self._on_change = on_change
        self._clock = clock
        self._term: _Term | None = None  # replaced whole: fence() reads it from any thread
        self._leading = False
        self._campaign_lease: int | None = None  # granted, not yet known to be a term's
        self._resigned = False
        self._subscribed = False

    @property
    def is_leader(self) -> bool:
        """Whether this replica leads, as last announced through `on_change`."""
        return self._leading

    def fence(self) -> int | None:
        """The fence (the `leader` key's create_revision) while this replica leads and its
        lease is surely alive on etcd; None otherwise. Any thread may call it."""
        term = self._term
        if term is None or self._clock() - term.renewed >= self.valid_for:
            return None
        return term.fence

    def leader(self) -> LeaderInfo | None:
        """Who leads, from the mirror; None when nobody does or the key does not decode."""
        meta = self._store.meta(LEADER_KEY)
        return None if meta is None else decode_leader(meta.value, meta.create_revision)

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, lead, follow, campaign again, until `stop` is set or `resign` runs."""
        self._loop = asyncio.get_running_loop()
        if not self._subscribed:
            self._store.subscribe(LEADER_KEY, self._key_changed)
            self._subscribed = True
        while not stop.is_set() and not self._resigned:
            if self._term is None:
                await self._follow(stop)
            else:
                lease = await self._lead(stop)
                if lease is not None:  # stepped down: the lease is no use any more
                    await self._give_up(lease)

    async def resign(self) -> None:
        """Clean stop: stop acting as leader, delete the key if it is still ours and revoke
        the lease, so another replica leads at once. Ends `run`; etcd failures are logged."""
        self._resigned = True
        self._wake.set()
        term, self._term = self._term, None
        self._set_role(False, "it resigned")
        if term is not None:
            fence = term.fence
            try:
                await asyncio.to_thread(self._store.fenced(lambda: fence).delete, LEADER_KEY)
            except NotLeader:
                pass  # the key is not ours any more: nothing of ours to delete
            except StoreError as exc:
                log.warning("replica %s cannot delete the leader key: %s", self.replica_id, exc)
        pending, self._campaign_lease = self._campaign_lease, None
        for lease in (term.lease if term else None, pending):
            if lease is not None:
                await self._give_up(lease)

    async def _give_up(self, lease: int) -> None:
        """Revoke a lease this replica no longer uses (its key goes with it); errors are logged."""
        await revoke_quietly(self._store, lease, f"replica {self.replica_id}", log)

    def _key_changed(self, key: str, _value: bytes | None) -> None:  # on the store's thread
        if key == LEADER_KEY:
            self._wake_soon()  # the `leader` key changed in the mirror

    async def _follow(self, stop: asyncio.Event) -> None:
        """Campaign until this replica leads (then return), `stop`, or resign."""
        failures = 0
        while not stop.is_set() and not self._resigned:
            self._wake.clear()
            try:
                if await self._campaign():
                    return
            except StoreError as exc:
                failures += 1
                if failures == 1:
                    log.warning("replica %s cannot campaign for leader (retrying): %s", self.replica_id, exc)
                await pause(stop, self._wake, backoff_delay(failures - 1, RETRY_BASE, self.ttl / 2, self._rng))
                continue
            failures = 0
            await pause(stop, self._wake, self.ttl / 2)  # until the key goes, or ttl/2

    async def _campaign(self) -> bool:
        """One try at creating the key on a new lease; True when this replica now leads."""
        sent = self._clock()
        lease = self._campaign_lease = await asyncio.to_thread(self._store.grant_lease, self.ttl)
        value = json.dumps({"id": self.replica_id, "url": self.url, "since": utc_now()}, sort_keys=True).encode()
        try:
            fence = await asyncio.to_thread(self._store.create_leased, LEADER_KEY, value, lease)
            if fence is not None and self._clock() - sent >= self.valid_for:
                raise StoreError(f"etcd took over {self.valid_for:g}s to answer a campaign: giving the lease up")
        except StoreError:
            self._campaign_lease = None
            await self._give_up(lease)  # the key too, if created
            raise
        # cancelled above: the lease stays in _campaign_lease for resign() to revoke
        self._campaign_lease = None
        if fence is None or self._resigned:
            await self._give_up(lease)
            return False
        self._term = _Term(lease, fence, sent)
        self._set_role(True, f"fence {fence}")
        return True

    async def _lead(self, stop: asyncio.Event) -> int | None:
        """Keep the lease alive while leading; the lease to give up after stepping down,
        None on `stop` or resign (the term stays for `resign`)."""
        failures = 0
        while not stop.is_set() and not self._resigned and self._term is not None:
            term = self._term
            self._wake.clear()
            deadline = term.renewed + self.valid_for
            if self._clock() >= deadline:
                return self._step_down(f"no keepalive reached etcd for {self.valid_for:g}s")
            if not self._key_is_ours(term):
                return self._step_down("the leader key was deleted or taken over")
            due = term.renewed + self.renew_every
            if failures:
                due = self._clock() + backoff_delay(failures - 1, RETRY_BASE, self.renew_every, self._rng)
            if await pause(stop, self._wake, min(due, deadline) - self._clock()) or self._clock() < min(due, deadline):
                continue  # the key changed (check it again), or stop
            if self._clock() >= deadline:
                continue
            sent = self._clock()
            call = asyncio.ensure_future(asyncio.to_thread(self._store.keepalive, term.lease))
            call.add_done_callback(_consume)
            done, _ = await asyncio.wait({call}, timeout=max(0.0, deadline - self._clock()))
            if not done or self._term is not term:
                continue  # no answer before the deadline (the loop steps down), or resigned
            try:
                alive = call.result()
            except StoreError as exc:
                failures += 1
                if failures == 1:
                    log.warning("replica %s cannot renew its leader lease (retrying): %s", self.replica_id, exc)
                continue
            if not alive:
                return self._step_down("its lease expired on etcd")
            failures = 0
            self._term = replace(term, renewed=sent)
        return None

    def _key_is_ours(self, term: _Term) -> bool:
        meta = self._store.meta(LEADER_KEY)
        # an older key still in the mirror is the mirror catching up, not a newer leader
        return meta is not None and meta.create_revision <= term.fence

    def _step_down(self, why: str) -> int | None:
        term, self._term = self._term, None
        self._set_role(False, why)
        return None if term is None else term.lease

    def _set_role(self, leading: bool, why: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            log.info("replica %s is the leader (%s)", self.replica_id, why)
        else:
            log.warning("replica %s stepped down: %s", self.replica_id, why)
        if self._on_change is not None:
            try:
                self._on_change(leading)
            except Exception:
                log.exception("replica %s: the role-change callback failed", self.replica_id)


def _consume(call: asyncio.Future[bool]) -> None:
    """Retrieve a keepalive's outcome nobody waits for any more (so asyncio does not complain)."""
    if not call.cancelled():
        call.exception()
