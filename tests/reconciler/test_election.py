"""election.py: one leader among replicas on a real etcd, handover, crashes, fencing, etcd outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from starmesh.reconciler.election import LEADER_KEY, LeaderElection
from starmesh.reconciler.errors import NotLeader
from starmesh.reconciler.etcd_store import EtcdStore

SHORT_TTL = 2.0
"""Seconds: leases that run out quickly, for the tests that wait for one to expire."""
LONG_TTL = 600.0
"""Seconds: far beyond the tests' waits (and followers retry only every 300 s), so anything
that happens within a wait happened through the watch, not through a lease running out."""


class Candidate:
    """One replica's election on its own store, with every on_change it got (and on which thread)."""

    def __init__(self, store: EtcdStore, replica_id: str, ttl: float) -> None:
        self.store = store
        self.id = replica_id
        self.changes: list[bool] = []
        self.threads: set[int] = set()
        self.election = LeaderElection(store, replica_id, f"http://{replica_id}.test", ttl=ttl, on_change=self._changed)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _changed(self, leading: bool) -> None:
        self.changes.append(leading)
        self.threads.add(threading.get_ident())

    def start(self) -> Candidate:
        self.task = asyncio.get_running_loop().create_task(self.election.run(self.stop))
        return self

    async def halt(self) -> None:
        """Stop `run` as a clean shutdown does (it returns; it may be cancelled if slow)."""
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    async def crash(self) -> None:
        """End `run` abruptly: no resign, no more keepalives."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def stop_all(candidates: list[Candidate]) -> None:
    for candidate in candidates:
        await candidate.crash()


def leaders(candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c.election.is_leader]


def alternates(changes: list[bool]) -> bool:
    """on_change came once per role change: True, False, True, ... with no repeats."""
    return all(change == (index % 2 == 0) for index, change in enumerate(changes))


def test_one_leader_and_a_resign_hands_over_at_once(open_store: Callable[..., EtcdStore], h: Any) -> None:
    async def main() -> None:
        group = [Candidate(open_store(), f"r{n}", LONG_TTL).start() for n in (1, 2, 3)]
        try:
            await h.until(lambda: len(leaders(group)) == 1, "one leader")
            first = leaders(group)[0]
            await h.until(
                lambda: all((info := c.election.leader()) is not None and info.id == first.id for c in group),
                "every replica's mirror naming the leader",
            )
            assert len(leaders(group)) == 1
            info = first.election.leader()
            assert info is not None and info.url == f"http://{first.id}.test" and info.since.endswith("Z")
            assert first.election.fence() == info.fence
            assert first.changes == [True] and first.threads == {threading.get_ident()}  # on the loop
            assert all(c.changes == [] and c.election.fence() is None for c in group if c is not first)

            await first.halt()
            await first.election.resign()
            assert not first.election.is_leader and first.election.fence() is None
            assert first.changes == [True, False]
            rest = [c for c in group if c is not first]
            # the lease would last 600 s and followers retry every 300 s: only the deleted key
            # (through the watch) can hand over within the wait
            await h.until(lambda: len(leaders(rest)) == 1, "another leader after the resign")
            second = leaders(rest)[0]
            new_fence = second.election.fence()
            assert new_fence is not None and new_fence > info.fence

            # the old leader's writes are fenced off; the new one's go through
            with pytest.raises(NotLeader):
                await asyncio.to_thread(first.store.fenced(first.election.fence).put, "status/owner", b"r-old")
            with pytest.raises(NotLeader):
                await asyncio.to_thread(first.store.fenced(lambda: info.fence).put, "status/owner", b"r-old")
            await asyncio.to_thread(second.store.fenced(second.election.fence).put, "status/owner", second.id.encode())
            assert second.store.get("status/owner") == second.id.encode()
            assert all(alternates(c.changes) for c in group)
        finally:
            await stop_all(group)

    h.run(main)


def test_a_crashed_leader_is_replaced_when_its_lease_expires(open_store: Callable[..., EtcdStore], h: Any) -> None:
    async def main() -> None:
        group = [Candidate(open_store(), f"r{n}", SHORT_TTL).start() for n in (1, 2)]
        try:
            await h.until(lambda: len(leaders(group)) == 1, "one leader")
            crashed = leaders(group)[0]
            old_fence = crashed.election.fence()
            assert old_fence is not None
            await crashed.crash()
            survivor = next(c for c in group if c is not crashed)
            await h.until(lambda: survivor.election.is_leader, "the survivor leading once the lease expired")
            # the safety property: by the time another replica leads, the old one's fence is gone
            assert crashed.election.fence() is None
            new_fence = survivor.election.fence()
            assert new_fence is not None and new_fence > old_fence
            with pytest.raises(NotLeader):
                await asyncio.to_thread(crashed.store.fenced(crashed.election.fence).put, "status/owner", b"old")
            with pytest.raises(NotLeader):  # even a write that still believed in the old fence
                await asyncio.to_thread(crashed.store.fenced(lambda: old_fence).put, "status/owner", b"old")
            assert survivor.changes == [True]
        finally:
            await stop_all(group)

    h.run(main)


def test_a_leader_whose_key_goes_steps_down(open_store: Callable[..., EtcdStore], h: Any) -> None:
    async def main() -> None:
        group = [Candidate(open_store(), f"r{n}", LONG_TTL).start() for n in (1, 2)]
        operator = open_store()
        try:
            await h.until(lambda: len(leaders(group)) == 1, "one leader")
            deposed = leaders(group)[0]
            await h.until(lambda: operator.meta(LEADER_KEY) is not None, "the leader key in a third mirror")
            meta = operator.meta(LEADER_KEY)
            assert meta is not None and meta.lease != 0 and meta.create_revision == deposed.election.fence()
            await asyncio.to_thread(operator.revoke, meta.lease)  # as `etcdctl lease revoke` would
            # with a 600 s ttl no keepalive is due within the wait: the watch tells the leader
            await h.until(lambda: deposed.changes[-1:] == [False], "the leader stepping down")
            assert deposed.election.fence() is None
            await h.until(lambda: len(leaders(group)) == 1, "a leader again")
            fence = leaders(group)[0].election.fence()
            assert fence is not None and fence > meta.create_revision
            assert all(alternates(c.changes) for c in group)
        finally:
            await stop_all(group)

    h.run(main)


def test_the_leader_steps_down_while_etcd_is_gone(open_store: Callable[..., EtcdStore], etcd_server: Any, h: Any) -> None:
    async def main() -> None:
        group = [Candidate(open_store(), f"r{n}", SHORT_TTL).start() for n in (1, 2)]
        try:
            await h.until(lambda: len(leaders(group)) == 1, "one leader")
            leader = leaders(group)[0]
            old_fence = leader.election.fence()
            assert old_fence is not None
            etcd_server.kill()
            await h.until(lambda: not leaders(group), "the leader stepping down on its own")
            assert leader.changes == [True, False]
            assert all(c.election.fence() is None for c in group)
            etcd_server.start()
            await h.until(lambda: len(leaders(group)) == 1, "a leader once etcd is back")
            fence = leaders(group)[0].election.fence()
            assert fence is not None and fence > old_fence
            assert all(alternates(c.changes) for c in group)
        finally:
            await stop_all(group)

    h.run(main)


def test_leader_reads_the_mirror_and_ignores_what_does_not_decode(open_store: Callable[..., EtcdStore], h: Any) -> None:
    store = open_store()
    election = LeaderElection(store, "r1", "http://r1.test", ttl=SHORT_TTL)
    assert election.leader() is None and not election.is_leader and election.fence() is None
    for bad in (b"not json", b"[1]", json.dumps({"id": "r9", "url": 3, "since": "x"}).encode()):
        store.put(LEADER_KEY, bad)
        assert election.leader() is None
    store.put(LEADER_KEY, json.dumps({"id": "r9", "url": "http://r9", "since": "2026-11-26T17:00:00.000Z"}).encode())
    info = election.leader()
    assert info is not None and info.to_json() == {"id": "r9", "url": "http://r9", "since": "2026-11-26T17:00:00.000Z"}
    meta = store.meta(LEADER_KEY)
    assert meta is not None and info.fence == meta.create_revision


def test_a_fractional_ttl_rounds_up_and_the_leader_acts_for_less_than_it(open_store: Callable[..., EtcdStore]) -> None:
    store = open_store()
    for ttl, seconds in ((0.4, 1), (1.5, 2), (10, 10)):
        election = LeaderElection(store, "r1", "http://r1.test", ttl=ttl)
        assert election.ttl == seconds
        assert 0 < election.renew_every < election.valid_for < election.ttl
        assert election.renew_every <= election.ttl / 3
