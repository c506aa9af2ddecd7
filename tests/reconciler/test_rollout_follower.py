"""A follower's read-only Rollout over the leader's ledger, and a role switch mid-rollout.

Two Rollouts share one Ledger on one FileStore, as two replicas share etcd; the watch that
makes a follower reload is played by calling `reload()` by hand. Both read one registry
(in a real deployment RegistrySync makes the replicas' registries agree)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from starmesh.reconciler.errors import NotLeader
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.model import ReleaseRecord
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout, RolloutPolicy
from starmesh.reconciler.store import FileStore

LIVE = ["p1", "p2", "p3", "p4"]


@dataclass
class Pair:
    """A leader's and a follower's Rollout on one ledger and registry, with hand-moved clocks."""

    h: Any
    tmp: Path
    ledger: Ledger
    issuer: Issuer
    registry: Registry
    leader: Rollout
    follower: Rollout
    wall: Any

    def issue(self, v1: int, percent: int = 0, bake: str = "0s", max_failures: int = 0) -> tuple[ReleaseRecord, RolloutPolicy]:
        root = self.tmp / f"policy-{v1}-{percent}-{bake}-{max_failures}"
        text = self.h.rollout_policy(v1, percent=percent, bake=bake, max_failures=max_failures)
        data = self.h.compile_policy(root, text)
        return self.issuer.issue(self.ledger.put_bundle(data), commit=f"commit-{v1}", reason="commit"), \
            RolloutPolicy.from_bundle(data)  # fmt: skip

    def release(self, rollout: Rollout, v1: int, **policy: Any) -> ReleaseRecord:
        record, rollout_policy = self.issue(v1, **policy)
        rollout.start(record, rollout_policy)
        return record

    def report(self, rollout: Rollout, proxy_id: str, record: ReleaseRecord, error: str | None = None) -> None:
        """The proxy reports to the replica whose rollout this is (its API calls both)."""
        self.registry.report(proxy_id, record.version, record.bundle, error)
        rollout.on_report(proxy_id, record.version, record.bundle, error)


@pytest.fixture
def pair(tmp_path: Path, h: Any) -> Pair:
    keys = h.keys(tmp_path / "keys")
    ledger = Ledger(FileStore(tmp_path / "state"))
    issuer = Issuer(ledger, keys.signer())
    wall = h.Clock(1_800_000_000.0)
    registry = Registry(ttl=30, forget_after=600, clock=h.Clock(100.0), warmup=0)
    for n, proxy_id in enumerate(LIVE):
        registry.heartbeat(proxy_id, "reviews", "v1", f"127.0.0.1:{9000 + n}", release_version=None, bundle=None)
    leader = Rollout(ledger, issuer, registry, clock=wall)
    follower = Rollout(ledger, issuer, registry, clock=wall, writable=False)
    return Pair(h, tmp_path, ledger, issuer, registry, leader, follower, wall)


def stable(pair: Pair) -> ReleaseRecord:
    """A first release every proxy ACKed to the leader: complete, the stable one."""
    record = pair.release(pair.leader, 100)
    for proxy_id in LIVE:
        pair.report(pair.leader, proxy_id, record)
    assert pair.leader.to_json()["phase"] == "complete"
    return record


def canaries_for(version: int, count: int) -> list[str]:
    return sorted(LIVE, key=lambda p: hashlib.sha256(f"{version}:{p}".encode()).digest())[:count]


def test_the_follower_serves_what_the_leader_wrote_once_it_reloads(pair: Pair) -> None:
    first = stable(pair)
    assert pair.follower.release_for("p1") is None  # it has not looked at the store since
    pair.follower.reload()
    assert all(pair.follower.release_for(p) == first for p in [*LIVE, None])

    new = pair.release(pair.leader, 0, percent=50, bake="1m")
    canary = canaries_for(new.version, 2)
    others = [p for p in LIVE if p not in canary]
    assert pair.follower.release_for(canary[0]) == first  # not reloaded yet
    pair.follower.reload()
    document = pair.follower.to_json()
    assert document["phase"] == "canary" and document["canary"] == canary
    assert document == pair.leader.to_json()
    assert all(pair.follower.release_for(p) == new for p in canary)
    assert all(pair.follower.release_for(p) == first for p in [*others, None])

    for proxy_id in canary:
        pair.report(pair.leader, proxy_id, new)
    pair.wall.now += 60
    pair.leader.tick()
    assert pair.leader.to_json()["phase"] == "promoted"
    pair.follower.reload()
    assert pair.follower.to_json()["phase"] == "promoted"
    assert all(pair.follower.release_for(p) == new for p in [*LIVE, None])


def test_a_follower_long_poll_wakes_when_it_reloads(pair: Pair) -> None:
    first = stable(pair)
    pair.follower.reload()

    async def main() -> ReleaseRecord | None:
        waiting = asyncio.ensure_future(pair.follower.wait_release("p1", first.version, pair.h.DEADLINE))
        await asyncio.sleep(0.05)
        new = pair.release(pair.leader, 0)  # the leader's own long-polls wake; the follower's wait on
        await asyncio.sleep(0.05)
        assert not waiting.done()
        pair.follower.reload()
        got = await waiting
        assert got == new
        return got

    assert asyncio.run(main()) is not None


def test_a_follower_refuses_leader_work_and_records_only_nack_holds(pair: Pair) -> None:
    first = stable(pair)
    new = pair.release(pair.leader, 0, percent=50)
    pair.follower.reload()
    canary = canaries_for(new.version, 2)
    with pytest.raises(NotLeader, match="not the leader"):
        pair.follower.start(new, RolloutPolicy())
    with pytest.raises(NotLeader):
        pair.follower.rollback(first.bundle)
    with pytest.raises(NotLeader):
        pair.follower.reissue()
    assert pair.ledger.current() == new  # nothing issued

    saved = pair.ledger.rollout_state()
    pair.report(pair.follower, canary[0], new, "golden request 'x' failed")
    pair.report(pair.follower, canary[1], new)
    assert pair.follower.nack_hold(canary[0]) > 0  # it holds the release back from the NACKer
    assert pair.follower.nack_hold(canary[1]) == 0
    pair.wall.now += 3600
    pair.follower.tick()
    assert pair.ledger.rollout_state() == saved  # but no failure, no ACK, no phase written
    document = pair.follower.to_json()
    assert document["phase"] == "canary" and document["failures"] == []


def test_a_new_leader_carries_the_canary_rollout_on_to_completion(pair: Pair) -> None:
    stable(pair)
    new = pair.release(pair.leader, 0, percent=50, bake="1m")
    canary = canaries_for(new.version, 2)
    pair.report(pair.leader, canary[0], new)
    assert pair.leader.to_json()["acked"] == [canary[0]]

    pair.leader.set_writable(False)  # deposed
    pair.follower.set_writable(True)  # elected: reloads, picks up the canaries and the ACK
    assert pair.follower.to_json() == pair.leader.to_json()
    pair.report(pair.follower, canary[1], new)
    document = pair.follower.to_json()
    assert document["phase"] == "baking" and document["acked"] == sorted(canary)
    pair.wall.now += 60
    pair.follower.tick()
    assert pair.follower.to_json()["phase"] == "promoted"
    for proxy_id in LIVE:
        if proxy_id not in canary:
            pair.report(pair.follower, proxy_id, new)
    assert pair.follower.to_json()["phase"] == "complete"

    pair.leader.reload()  # the old leader, now a follower, sees it through the store
    assert pair.leader.to_json()["phase"] == "complete"
    assert pair.leader.to_json()["stable"] == {"version": new.version, "bundle": new.bundle}
    with pytest.raises(NotLeader):
        pair.leader.rollback(new.bundle)


def test_a_new_leader_halts_on_a_nack_reported_while_nobody_led(pair: Pair) -> None:
    first = stable(pair)
    new = pair.release(pair.leader, 0, percent=50, max_failures=0)
    pair.follower.reload()
    canary = canaries_for(new.version, 2)
    pair.leader.set_writable(False)
    pair.report(pair.follower, canary[0], new, "golden request 'x' failed")  # no leader counts it
    assert pair.follower.to_json()["failures"] == []
    pair.follower.set_writable(True)  # its first tick reads the NACK from the registry
    document = pair.follower.to_json()
    assert document["phase"] == "halted"
    assert document["failures"] == [{"proxy": canary[0], "reason": f"NACK of release {new.version}: golden request 'x' failed"}]
    halt = pair.ledger.current()
    assert halt is not None and halt.reason == "halt" and halt.bundle == first.bundle


def test_a_new_leader_starts_a_release_issued_but_never_started(pair: Pair) -> None:
    stable(pair)
    orphan, _ = pair.issue(50)  # the old leader signed it and lost the lease before starting it
    pair.leader.set_writable(False)
    pair.follower.reload()
    assert pair.follower.to_json()["version"] != orphan.version  # a follower never starts it
    pair.follower.set_writable(True)
    assert pair.follower.to_json()["version"] == orphan.version
    assert pair.follower.release_for("p1") == orphan
