"""Staged rollouts on a real ledger, issuer (Ed25519) and registry, with clocks the test moves."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from starmesh.bundle.release import verify_release
from starmesh.reconciler.errors import UnknownBundle
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.model import ReleaseRecord
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import MAX_NACK_HOLD, Rollout, RolloutPolicy
from starmesh.reconciler.store import FileStore

POLICY = """\
mesh(name = "shop", mtls = "disable",
     rollout = rollout(canary_percent = {percent}, bake = "{bake}", max_failures = {max_failures}))
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""


@dataclass
class Plane:
    """A control plane's rollout parts on a state dir, with hand-moved clocks."""

    h: Any
    tmp: Path
    keys: Any
    ledger: Ledger
    issuer: Issuer
    registry: Registry
    rollout: Rollout
    wall: Any  # h.Clock: the rollout's clock (bake, NACK holds)
    mono: Any  # h.Clock: the registry's clock (staleness)
    issued_at: list[datetime]

    def bundle(self, v1: int, percent: int = 0, bake: str = "0s", max_failures: int = 0) -> tuple[str, RolloutPolicy]:
        root = self.tmp / f"policy-{v1}-{percent}-{bake}-{max_failures}"
        text = POLICY.format(percent=percent, bake=bake, max_failures=max_failures, v1=v1, v2=100 - v1)
        data = self.h.compile_policy(root, text)
        return self.ledger.put_bundle(data), RolloutPolicy.from_bundle(data)

    def release(self, v1: int, percent: int = 0, bake: str = "0s", max_failures: int = 0) -> ReleaseRecord:
        """Compile, store, issue and start a commit's release, as the reconciler does."""
        digest, rollout_policy = self.bundle(v1, percent, bake, max_failures)
        record = self.issuer.issue(digest, commit=f"commit-{v1}", reason="commit")
        self.rollout.start(record, rollout_policy)
        return record

    def stable(self, v1: int, live: list[str]) -> ReleaseRecord:
        """A release every live proxy ACKed: complete, the stable one."""
        record = self.release(v1)
        for proxy_id in live:
            self.ack(proxy_id, record)
        assert self.rollout.to_json()["phase"] == "complete"
        return record

    def proxies(self, *ids: str) -> None:
        for n, proxy_id in enumerate(ids):
            address = f"127.0.0.1:{9000 + n}"
            self.registry.heartbeat(proxy_id, "reviews", "v1", address, release_version=None, bundle=None)

    def ack(self, proxy_id: str, record: ReleaseRecord) -> None:
        self.registry.report(proxy_id, record.version, record.bundle, None)
        self.rollout.on_report(proxy_id, record.version, record.bundle, None)

    def nack(self, proxy_id: str, record: ReleaseRecord, error: str = "golden request 'x' failed") -> None:
        self.registry.report(proxy_id, record.version, record.bundle, error)
        self.rollout.on_report(proxy_id, record.version, record.bundle, error)

    def restart(self) -> Rollout:
        """A new Rollout on the same state (a restarted control plane, its registry kept)."""
        return Rollout(self.ledger, self.issuer, self.registry, clock=self.wall)

    def state(self, proxy_id: str) -> str:
        entry = self.registry.get(proxy_id)
        assert entry is not None
        return self.rollout.state_of(entry)


@pytest.fixture
def plane(tmp_path: Path, h: Any) -> Plane:
    keys = h.keys(tmp_path / "keys")
    ledger = Ledger(FileStore(tmp_path / "state"))
    issued_at = [datetime(2026, 11, 26, 9, 0, tzinfo=UTC)]
    issuer = Issuer(ledger, keys.signer(), now=lambda: issued_at[0])
    mono, wall = h.Clock(100.0), h.Clock(1_800_000_000.0)
    registry = Registry(ttl=30, forget_after=600, clock=mono, warmup=0)
    rollout = Rollout(ledger, issuer, registry, clock=wall)
    return Plane(h, tmp_path, keys, ledger, issuer, registry, rollout, wall, mono, issued_at)


def shown(rollout: Rollout) -> Any:
    """The rollout's `/v1/status` document, for reading in asserts."""
    return rollout.to_json()


def canaries_for(version: int, live: list[str], count: int) -> list[str]:
    return sorted(live, key=lambda p: hashlib.sha256(f"{version}:{p}".encode()).digest())[:count]


def test_the_first_release_goes_to_everyone_and_becomes_stable(plane: Plane) -> None:
    assert plane.rollout.release_for(None) is None and plane.rollout.to_json()["phase"] is None
    plane.proxies("a", "b")
    first = plane.release(100, percent=50)  # canaries need a stable release to fall back to
    assert plane.rollout.to_json()["phase"] == "promoted"
    assert plane.rollout.release_for("a") == plane.rollout.release_for(None) == first
    assert plane.state("a") == "pending"
    plane.ack("a", first)
    assert plane.state("a") == "synced" and plane.rollout.to_json()["phase"] == "promoted"
    plane.ack("b", first)
    document = shown(plane.rollout)
    assert document["phase"] == "complete"
    assert document["stable"] == {"version": first.version, "bundle": first.bundle}
    assert document["acked"] == ["a", "b"]


def test_canary_bake_promote_complete(plane: Plane) -> None:
    live = ["p1", "p2", "p3", "p4", "p5"]
    plane.proxies(*live)
    stable = plane.stable(100, live)
    new = plane.release(50, percent=30, bake="1m")
    canary = canaries_for(new.version, live, 2)  # ceil(30% of 5)
    others = [p for p in live if p not in canary]
    document = shown(plane.rollout)
    assert document["phase"] == "canary" and document["canary"] == canary
    assert document["policy"] == {"canary_percent": 30, "bake_seconds": 60.0, "max_failures": 0}
    assert all(plane.rollout.release_for(p) == new for p in canary)
    assert all(plane.rollout.release_for(p) == stable for p in others)
    assert plane.rollout.release_for(None) == stable  # no proxy named: the stable release
    assert [plane.state(p) for p in live] == ["synced" if p in others else "pending" for p in live]

    plane.ack(canary[0], new)
    assert plane.rollout.to_json()["phase"] == "canary"
    plane.ack(canary[1], new)
    document = shown(plane.rollout)
    assert document["phase"] == "baking"
    assert document["bake_until"] == datetime.fromtimestamp(plane.wall.now + 60, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")  # fmt: skip
    assert plane.rollout.release_for(others[0]) == stable

    plane.wall.now += 59
    plane.rollout.tick()
    assert plane.rollout.to_json()["phase"] == "baking"

    async def promoted_wakes_a_waiter() -> ReleaseRecord | None:
        waiting = asyncio.ensure_future(plane.rollout.wait_release(others[0], stable.version, 30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        plane.wall.now += 1
        plane.rollout.tick()
        return await waiting  # woken by the promotion, long before the 30 s hold

    assert asyncio.run(promoted_wakes_a_waiter()) == new
    assert plane.rollout.to_json()["phase"] == "promoted"
    assert all(plane.rollout.release_for(p) == new for p in [*live, None])
    assert plane.state(others[0]) == "pending"
    for proxy_id in others[:-1]:
        plane.ack(proxy_id, new)
    assert plane.rollout.to_json()["phase"] == "promoted"
    plane.ack(others[-1], new)
    document = shown(plane.rollout)
    assert document["phase"] == "complete" and document["stable"] == {"version": new.version, "bundle": new.bundle}
    assert document["failures"] == [] and document["halted"] is None


def test_a_nack_beyond_max_failures_halts_and_rolls_everyone_back(plane: Plane) -> None:
    live = ["p1", "p2", "p3", "p4"]
    plane.proxies(*live)
    stable = plane.stable(100, live)
    new = plane.release(0, percent=50, max_failures=0)
    canary = shown(plane.rollout)["canary"]
    assert isinstance(canary, list) and len(canary) == 2
    plane.ack(canary[0], new)
    plane.nack(canary[1], new, "golden request 'to-v1' failed: got v2")

    document = shown(plane.rollout)
    assert document["phase"] == "halted"
    halt = plane.ledger.current()
    assert halt is not None and halt.reason == "halt"
    assert halt.version > new.version and halt.bundle == stable.bundle
    reason = f"NACK of release {new.version}: golden request 'to-v1' failed: got v2"
    assert document["failures"] == [{"proxy": canary[1], "reason": reason}]
    halted = document["halted"]
    assert isinstance(halted, dict) and halted["rolled_back_to"] == {"version": halt.version, "bundle": stable.bundle}
    assert "more than max_failures 0" in halted["reason"] and canary[1] in halted["reason"]
    assert document["stable"] == {"version": halt.version, "bundle": stable.bundle}
    assert all(plane.rollout.release_for(p) == halt for p in [*live, None])  # everyone, at once
    # The halt release is a real signed release of the stable bundle.
    verified = verify_release(
        halt.envelope, plane.keys.trusted(), applied_version=new.version, applied_digest=new.bundle,
        now=datetime(2026, 11, 26, 10, 0, tzinfo=UTC),
    )
    assert verified.release.bundle == stable.bundle and verified.release.version == halt.version

    plane.nack(canary[0], halt)  # a halt never halts again
    assert plane.ledger.current() == halt
    assert plane.restart().to_json()["phase"] == "halted"


def test_failures_up_to_max_failures_are_tolerated(plane: Plane) -> None:
    live = ["p1", "p2", "p3", "p4"]
    plane.proxies(*live)
    stable = plane.stable(100, live)
    new = plane.release(0, percent=50, max_failures=1)
    canary = shown(plane.rollout)["canary"]
    assert isinstance(canary, list)
    plane.nack(canary[0], new)
    assert plane.rollout.to_json()["phase"] == "canary"
    assert plane.state(canary[0]) == "failed"
    plane.ack(canary[1], new)
    assert plane.rollout.to_json()["phase"] == "promoted"  # bake 0s: straight through
    plane.nack(canary[1], new)  # one proxy counts once (it ACKed before; still one failure each)
    others = [p for p in live if p not in canary]
    plane.nack(others[0], new)  # a second failure: more than 1
    assert plane.rollout.to_json()["phase"] == "halted"
    current = plane.ledger.current()
    assert current is not None and current.bundle == stable.bundle and current.reason == "halt"


def test_a_canary_that_goes_stale_before_acking_is_a_failure(plane: Plane) -> None:
    live = ["p1", "p2", "p3"]
    plane.proxies(*live)
    plane.stable(100, live)
    new = plane.release(0, percent=1, max_failures=0)
    canary = shown(plane.rollout)["canary"]
    assert isinstance(canary, list) and len(canary) == 1  # ceil(1% of 3) = at least one
    plane.mono.now += 20
    plane.proxies(*[p for p in live if p not in canary])  # the others keep heartbeating
    plane.rollout.tick()
    assert plane.rollout.to_json()["phase"] == "canary"
    plane.mono.now += 15
    plane.rollout.tick()
    document = shown(plane.rollout)
    assert document["phase"] == "halted"
    reason = f"went stale before acknowledging release {new.version}"
    assert document["failures"] == [{"proxy": canary[0], "reason": reason}]
    assert plane.state(canary[0]) == "stale"


def test_a_promoted_target_that_goes_stale_before_acking_is_a_failure(plane: Plane) -> None:
    plane.proxies("p1", "p2")
    stable = plane.release(100)
    plane.ack("p1", stable)
    plane.ack("p2", stable)
    new = plane.release(0, max_failures=0)  # canary_percent 0: promoted at once
    assert plane.rollout.to_json()["phase"] == "promoted"
    plane.ack("p1", new)
    plane.mono.now += 31
    plane.registry.heartbeat("p1", "reviews", "v1", "127.0.0.1:9000", release_version=new.version, bundle=new.bundle)
    plane.rollout.tick()
    assert plane.rollout.to_json()["phase"] == "halted"
    assert [f["proxy"] for f in shown(plane.rollout)["failures"]] == ["p2"]


def test_rollout_state_survives_a_restart(plane: Plane) -> None:
    live = ["p1", "p2", "p3", "p4"]
    plane.proxies(*live)
    stable = plane.stable(100, live)
    new = plane.release(20, percent=50, bake="10m", max_failures=2)
    canary = shown(plane.rollout)["canary"]
    assert isinstance(canary, list)
    plane.nack(canary[0], new)
    plane.ack(canary[1], new)
    before = plane.rollout.to_json()
    assert before["phase"] == "baking"

    again = plane.restart()
    assert again.to_json() == before
    assert [again.release_for(p) for p in live] == [plane.rollout.release_for(p) for p in live]
    assert again.release_for(None) == stable
    plane.wall.now += 600
    again.tick()
    assert again.to_json()["phase"] == "promoted"
    state = json.loads(plane.ledger.rollout_state() or b"{}")
    assert state["phase"] == "promoted" and state["version"] == new.version and state["stable"] == stable.version


def test_a_release_issued_but_never_started_is_picked_up_at_start(plane: Plane) -> None:
    plane.proxies("p1")
    first = plane.stable(100, ["p1"])
    digest, _ = plane.bundle(40)
    crashed = plane.issuer.issue(digest, commit="c", reason="commit")  # the process died before start()
    again = plane.restart()
    assert again.release_for("p1") == crashed and again.to_json()["version"] == crashed.version
    assert again.to_json()["stable"] == {"version": first.version, "bundle": first.bundle}


def test_a_new_commit_supersedes_a_rollout_and_keeps_its_canaries(plane: Plane) -> None:
    live = [f"p{n}" for n in range(10)]
    plane.proxies(*live)
    stable = plane.stable(100, live)
    first = plane.release(10, percent=10, bake="1h")
    (canary,) = shown(plane.rollout)["canary"]
    plane.ack(canary, first)
    second = plane.release(20, percent=20, bake="1h")
    plane.rollout.start(first, RolloutPolicy())  # an older or repeated start is ignored
    document = shown(plane.rollout)
    assert document["version"] == second.version and document["phase"] == "canary"
    assert document["stable"] == {"version": stable.version, "bundle": stable.bundle}
    chosen = document["canary"]
    assert isinstance(chosen, list) and len(chosen) == 2 and chosen[0] == canary
    assert plane.rollout.release_for(canary) == second


def test_rollback_releases_an_old_bundle_as_a_new_version(plane: Plane) -> None:
    plane.proxies("p1", "p2")
    old = plane.release(100)
    plane.release(30)
    unknown = "sha256:" + hashlib.sha256(b"never compiled").hexdigest()
    with pytest.raises(UnknownBundle, match=unknown):
        plane.rollout.rollback(unknown)
    with pytest.raises(UnknownBundle, match="not a bundle digest"):
        plane.rollout.rollback("sha256:abc")
    assert plane.ledger.next_version() == 3  # nothing issued by the refusals (this allocates 3)

    back = plane.rollout.rollback(old.bundle)
    assert back.reason == "rollback" and back.bundle == old.bundle and back.version == 4
    assert back.commit is None  # the bundle's own source.commit: these were compiled outside Git
    assert plane.rollout.to_json()["phase"] == "promoted"
    assert plane.rollout.release_for("p1") == back == plane.ledger.current()


def test_nack_backoff_doubles_per_repeated_nack_and_resets(plane: Plane) -> None:
    plane.proxies("p1")
    first = plane.release(100)
    assert plane.rollout.nack_hold("p1") == 0.0
    holds = []
    for _ in range(11):
        plane.nack("p1", first)
        holds.append(plane.rollout.nack_hold("p1"))
    assert holds == [1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_NACK_HOLD, MAX_NACK_HOLD]
    plane.wall.now += 299.5
    assert plane.rollout.nack_hold("p1") == pytest.approx(0.5)
    plane.wall.now += 1
    assert plane.rollout.nack_hold("p1") == 0.0
    plane.nack("p1", first)
    plane.ack("p1", first)  # an ACK clears it
    assert plane.rollout.nack_hold("p1") == 0.0
    plane.nack("p1", first)
    assert plane.rollout.nack_hold("p1") == 1.0  # counting starts again
    plane.release(50)  # a newer release is sent at once
    assert plane.rollout.nack_hold("p1") == 0.0
    assert plane.state("p1") == "pending"


def test_a_nack_without_a_version_is_about_the_release_it_was_sent(plane: Plane) -> None:
    plane.proxies("p1")
    first = plane.release(100)
    plane.registry.report("p1", None, None, "release refused: signature by an untrusted key")
    plane.rollout.on_report("p1", None, None, "release refused: signature by an untrusted key")
    assert plane.rollout.nack_hold("p1") == 1.0
    assert plane.state("p1") == "failed"
    assert [f["proxy"] for f in shown(plane.rollout)["failures"]] == ["p1"]
    assert first.version == 1


def test_reissue_at_half_life_once_complete(plane: Plane) -> None:
    plane.proxies("p1", "p2")
    first = plane.release(100)
    plane.ack("p1", first)
    assert plane.rollout.reissue() is None  # promoted, but not due
    plane.ack("p2", first)
    plane.issued_at[0] += timedelta(days=3, hours=12)
    again = plane.rollout.reissue()
    assert again is not None and again.reason == "reissue" and again.bundle == first.bundle
    assert again.version == first.version + 1
    assert plane.rollout.release_for("p1") == again
    assert plane.state("p1") == "pending"  # it runs the bundle, under an older version
    plane.ack("p1", again)
    assert plane.state("p1") == "synced"
    plane.ack("p2", again)
    assert plane.rollout.to_json()["stable"] == {"version": again.version, "bundle": first.bundle}

    new = plane.release(10, percent=50, bake="1h")
    plane.issued_at[0] += timedelta(days=7)
    assert plane.rollout.to_json()["phase"] == "canary"
    assert plane.rollout.reissue() is None  # never while canaries run
    assert plane.rollout.release_for(None) == again and new.version > again.version
