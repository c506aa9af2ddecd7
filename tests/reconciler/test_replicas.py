"""replicas.py: every replica's leased record on a real etcd; leaving, crashing, re-joining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import datetime
from collections.abc import Callable
from typing import Any, cast

import pytest

from starmesh.reconciler.election import LeaderElection
from starmesh.reconciler.etcd_store import EtcdStore
from starmesh.reconciler.replicas import REPLICAS_PREFIX, ReplicaInfo, ReplicaSet, check_replica_id, lease_seconds

TTL = 2.0
"""Seconds: a crashed replica's record goes this long after its last renewal."""
LONG_TTL = 600.0
"""Seconds: far beyond the tests' waits, so a record gone within one was revoked."""


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, "r 1", "ré", "r1\n"])
def test_bad_replica_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid replica id"):
        check_replica_id(bad)
    with pytest.raises(ValueError, match="invalid replica id"):
        ReplicaSet(cast(EtcdStore, None), bad, "http://x")
    with pytest.raises(ValueError, match="invalid replica id"):
        LeaderElection(cast(EtcdStore, None), bad, "http://x")


def test_good_ids_and_ttls() -> None:
    assert check_replica_id("cp-1.eu_WEST") == "cp-1.eu_WEST"
    assert check_replica_id("x" * 64) == "x" * 64
    assert [lease_seconds(t) for t in (0.3, 1, 1.2, 10)] == [1, 1, 2, 10]
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="invalid lease ttl"):
            lease_seconds(bad)
        with pytest.raises(ValueError, match="invalid lease ttl"):
            ReplicaSet(cast(EtcdStore, None), "r1", "http://x", ttl=bad)


class Member:
    """One replica's ReplicaSet on its own store, running until stopped or crashed."""

    def __init__(
        self, store: EtcdStore, replica_id: str, ttl: float = TTL, *, key: str | None = "k1",
        repo: str | None = "https://git.test/mesh.git", branch: str | None = "main",
    ) -> None:  # fmt: skip
        self.store = store
        self.role = "follower"
        self.set = ReplicaSet(
            store, replica_id, f"http://{replica_id}.test", ttl=ttl, role=lambda: self.role,
            key=key, repo=repo, branch=branch,
        )  # fmt: skip
        self.stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.set.run(self.stop))

    async def crash(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def ids(replicas: ReplicaSet) -> list[str]:
    return [info.id for info in replicas.replicas()]


def test_replicas_join_leave_and_crash(open_store: Callable[..., EtcdStore], h: Any) -> None:
    async def main() -> None:
        members = [Member(open_store(), "r3"), Member(open_store(), "r1"), Member(open_store(), "r2", LONG_TTL)]
        watcher = open_store()
        try:
            await h.until(lambda: all(ids(m.set) == ["r1", "r2", "r3"] for m in members), "three replicas listed")
            first = members[1].set.replicas()[0]
            assert first.to_json() == {
                "id": "r1",
                "url": "http://r1.test",
                "role": "follower",
                "started_at": members[1].set.started_at,
                "seen_at": first.seen_at,
                "key": "k1",
                "repo": "https://git.test/mesh.git",
                "branch": "main",
            }
            assert first.seen_at.endswith("Z") and first.started_at <= first.seen_at
            assert all(m.set.problems() == [] for m in members)  # all alike: nothing to say

            # records are rewritten: the role as it is now, seen_at moving on
            members[1].role = "leader"
            members[1].set.refresh()
            await h.until(
                lambda: [(r.id, r.role) for r in members[0].set.replicas()][0] == ("r1", "leader"), "r1's new role"
            )
            await h.until(lambda: members[0].set.replicas()[0].seen_at > first.seen_at, "r1's seen_at moving on")

            # a record that does not decode, or sits under another id's key, is skipped
            await asyncio.to_thread(watcher.put, REPLICAS_PREFIX + "junk", b"{not json")
            await asyncio.to_thread(watcher.put, REPLICAS_PREFIX + "r9", members[1].store.get("replicas/r1") or b"")
            await h.until(lambda: watcher.get(REPLICAS_PREFIX + "r9") is not None, "the odd records in the mirror")
            assert ids(members[1].set) == ["r1", "r2", "r3"]

            # leaving revokes the lease: the record goes at once (r2's lease would last 600 s)
            leaving = members[2]
            leaving.stop.set()
            await leaving.task
            await leaving.set.leave()
            await h.until(lambda: all(ids(m.set) == ["r1", "r3"] for m in members[:2]), "r2 gone after leaving")

            # a crash stops the renewals: the record goes when the lease runs out
            await members[0].crash()
            await h.until(lambda: ids(members[1].set) == ["r1"], "r3 gone after its lease expired")
        finally:
            for member in members:
                await member.crash()

    h.run(main)


def test_a_replica_whose_lease_expired_writes_its_record_again(open_store: Callable[..., EtcdStore], h: Any) -> None:
    async def main() -> None:
        member = Member(open_store(), "r1")
        operator = open_store()
        try:
            await h.until(lambda: operator.meta(REPLICAS_PREFIX + "r1") is not None, "r1's record")
            meta = operator.meta(REPLICAS_PREFIX + "r1")
            assert meta is not None and meta.lease != 0
            await asyncio.to_thread(operator.revoke, meta.lease)  # as if etcd had expired it
            assert operator.meta(REPLICAS_PREFIX + "r1") is None
            await h.until(
                lambda: (now := operator.meta(REPLICAS_PREFIX + "r1")) is not None and now.lease not in (0, meta.lease),
                "r1's record back on a new lease",
            )
        finally:
            await member.crash()

    h.run(main)


def test_status_ages_come_from_the_answering_replicas_clock() -> None:
    seen = datetime.fromisoformat("2026-11-26T17:00:00.000Z").timestamp()
    info = ReplicaInfo("r1", "http://r1.test", "leader", "2026-11-26T16:59:00.000Z", "2026-11-26T17:00:00.000Z")
    assert "seen_seconds_ago" not in info.to_json()  # stored without it
    assert info.to_json(now=seen + 2.5)["seen_seconds_ago"] == 2.5
    assert info.to_json(now=seen - 3)["seen_seconds_ago"] == 0.0  # a replica whose clock runs ahead
    odd = ReplicaInfo("r1", "http://r1.test", "leader", "x", "yesterday")
    assert odd.to_json(now=time.time())["seen_seconds_ago"] is None


def test_replicas_that_sign_with_another_key_or_follow_another_branch_say_so(
    open_store: Callable[..., EtcdStore], h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "starmesh.control_plane.replicas")

    async def main() -> None:
        r1 = Member(open_store(), "r1", key="aaaa")
        r2 = Member(open_store(), "r2", key="bbbb", branch="release")
        old = Member(open_store(), "r3", key=None, repo=None, branch=None)  # an older replica: not compared
        try:
            await h.until(lambda: all(ids(m.set) == ["r1", "r2", "r3"] for m in (r1, r2, old)), "three replicas")
            assert r1.set.problems() == [
                "replica r2 signs with key bbbb, this one (r1) with aaaa: proxies trusting only one key will NACK "
                "releases after a failover",
                "replica r2 follows https://git.test/mesh.git branch release, this one (r1) https://git.test/mesh.git "
                "branch main: a failover would release another policy",
            ]
            assert r2.set.problems() == [
                "replica r1 signs with key aaaa, this one (r2) with bbbb: proxies trusting only one key will NACK "
                "releases after a failover",
                "replica r1 follows https://git.test/mesh.git branch main, this one (r2) https://git.test/mesh.git "
                "branch release: a failover would release another policy",
            ]
            assert old.set.problems() == []
            for _ in range(3):  # asked again (and at every refresh): logged once per difference
                r1.set.problems()
            await h.until(lambda: "replica r1 signs with key aaaa" in caplog.text, "r2's log")
            assert caplog.text.count("replica r2 signs with key bbbb, this one (r1)") == 1
            assert caplog.text.count("replica r2 follows") == 1

            await r2.crash()  # gone once its lease runs out: nothing left to say
            await h.until(lambda: ids(r1.set) == ["r1", "r3"], "r2 gone")
            assert r1.set.problems() == []
        finally:
            for member in (r1, r2, old):
                await member.crash()

    h.run(main)
