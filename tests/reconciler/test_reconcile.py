"""The reconcile loop against a real Git repository, a real state dir and real keys.

    commit ──► Reconciler.reconcile() ──► ReconcileResult + ledger (releases, last_compile)

Every part is the real one (FileStore, Ledger, Issuer, Registry, Rollout, RepoSource);
waits poll for a condition with a generous deadline, never assert on elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from starmesh.bundle.canonical import decode_bundle
from starmesh.bundle.release import verify_release
from starmesh.reconciler.errors import StoreError
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.reconcile import ReconcileResult, Reconciler
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout
from starmesh.reconciler.source import RepoSource
from starmesh.reconciler.store import FileStore

DEADLINE = 30.0  # seconds the loop may take to stop: a bound, never an assertion about speed

SYNTAX_ERROR = 'mesh(name = "shop"\nservice(name = "api")\n'


@dataclass
class Plane:
    """A control plane's reconcile parts on one state dir."""

    repo: Path
    state: Path
    keys: Any
    clock: Any  # h.Clock of datetimes: the issuer's wall clock, moved by hand
    ledger: Ledger
    issuer: Issuer
    registry: Registry
    rollout: Rollout
    reconciler: Reconciler

    def reconcile(self) -> ReconcileResult:
        return asyncio.run(self.reconciler.reconcile())

    def restarted(self, **kw: Any) -> Plane:
        return build(self.repo, self.state, self.keys, self.clock, **kw)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The reconcile loop as a task for the block; stopped, and awaited, at its end."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.reconciler.run(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, DEADLINE)


def build(repo: Path, state: Path, keys: Any, clock: Any, **kw: Any) -> Plane:
    ledger = Ledger(FileStore(state / "store"))
    issuer = Issuer(ledger, keys.signer(), now=clock)
    registry = Registry(ttl=30)
    rollout = Rollout(ledger, issuer, registry)
    source = RepoSource(str(repo), "main", state)
    reconciler = Reconciler(source, ledger, issuer, rollout, registry=registry, **kw)
    return Plane(repo, state, keys, clock, ledger, issuer, registry, rollout, reconciler)


@pytest.fixture
def plane(tmp_path: Path, h: Any) -> Plane:
    repo = h.make_repo(tmp_path / "policy")
    clock = h.Clock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    return build(repo, tmp_path / "state", h.keys(tmp_path / "keys"), clock)


# -- one pass ------------------------------------------------------------------------------


def test_the_first_commit_is_released_signed_and_stored(plane: Plane, h: Any) -> None:
    tip = h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    result = plane.reconcile()
    assert result.outcome == "released"
    assert result.commit == tip and result.release is not None
    record = result.release
    assert (record.version, record.previous, record.commit, record.reason) == (1, None, tip, "commit")
    assert plane.ledger.current() == record
    assert plane.ledger.last_commit() == tip
    status = plane.ledger.last_compile()
    assert status is not None and status.ok and status.commit == tip and status.digest == record.bundle
    bundle = decode_bundle(plane.ledger.bundle(record.bundle), record.bundle)
    assert bundle.source.commit == tip
    verified = verify_release(
        record.envelope, plane.keys.trusted(), applied_version=None, applied_digest=None, now=plane.clock()
    )
    assert (verified.release.version, verified.release.bundle, verified.release.mesh) == (1, record.bundle, "shop")
    assert plane.rollout.release_for(None) == record
    assert plane.reconciler.phase == "idle"


def test_the_same_tip_is_no_work(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    plane.reconcile()
    phases: list[str] = []
    plane.reconciler.on_status = phases.append
    again = plane.reconcile()
    assert again.outcome == "unchanged-commit"
    assert not any(p.startswith("compiling") for p in phases), phases
    assert plane.ledger.high_water() == 1


def test_a_behaviour_change_is_the_next_version_with_previous(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    first = plane.reconcile().release
    tip = h.commit(plane.repo, {"mesh.star": h.policy("v2")})
    phases: list[str] = []
    plane.reconciler.on_status = phases.append
    second = plane.reconcile()
    assert second.outcome == "released" and second.release is not None and first is not None
    assert (second.release.version, second.release.previous, second.release.commit) == (2, first.bundle, tip)
    assert second.release.bundle != first.bundle
    assert f"compiling {tip[:12]}" in phases, "status is written before the compile"
    assert plane.rollout.release_for(None) == second.release


def test_a_syntax_error_is_rejected_with_locations_and_the_release_stays(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    good = plane.reconcile().release
    bad = h.commit(plane.repo, {"mesh.star": SYNTAX_ERROR})
    result = plane.reconcile()
    assert result.outcome == "rejected" and result.commit == bad
    assert "mesh.star:" in result.detail
    status = plane.ledger.last_compile()
    assert status is not None and not status.ok and status.commit == bad and status.digest is None
    errors = [d for d in status.diagnostics if d["severity"] == "error"]
    assert errors, status.diagnostics
    first = errors[0]
    assert first["file"] == "mesh.star"
    assert isinstance(first["line"], int) and first["line"] >= 1
    assert isinstance(first["col"], int) and first["col"] >= 1
    assert set(first) == {"file", "line", "col", "code", "severity", "message", "hint"}
    assert plane.ledger.current() == good
    assert plane.ledger.last_commit() == bad
    assert plane.reconcile().outcome == "unchanged-commit", "a rejected tip is not compiled again"
    fixed = h.commit(plane.repo, {"mesh.star": h.policy("v2")})
    after = plane.reconcile()
    assert after.outcome == "released" and after.release is not None and good is not None
    assert (after.release.version, after.release.commit, after.release.previous) == (2, fixed, good.bundle)
    status = plane.ledger.last_compile()
    assert status is not None and status.ok and status.commit == fixed


def test_a_failing_golden_request_is_rejected(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    plane.reconcile()
    h.commit(plane.repo, {"mesh.star": h.policy("v2", expect="v1")})
    result = plane.reconcile()
    assert result.outcome == "rejected"
    status = plane.ledger.last_compile()
    assert status is not None
    assert [d["code"] for d in status.diagnostics if d["severity"] == "error"] == ["SM501"]
    assert plane.ledger.high_water() == 1


def test_a_commit_without_the_entry_file_is_one_source_diagnostic(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"README.md": "policy lives elsewhere\n"})
    result = plane.reconcile()
    assert result.outcome == "rejected"
    status = plane.ledger.last_compile()
    assert status is not None and not status.ok
    assert len(status.diagnostics) == 1
    (diagnostic,) = status.diagnostics
    assert (diagnostic["code"], diagnostic["severity"], diagnostic["file"]) == ("source", "error", "mesh.star")
    assert "mesh.star" in str(diagnostic["message"])
    assert plane.ledger.current() is None
    # No release exists, and the same rejected tip is not compiled again in this process...
    assert plane.reconcile().outcome == "unchanged-commit"
    # ...but a restarted control plane tries it once more (its compiler may be newer).
    assert plane.restarted().reconcile().outcome == "rejected"


def test_subdir_and_entry_pick_the_policy_root(plane: Plane, h: Any) -> None:
    tip = h.commit(plane.repo, {"deploy/policy/root.star": h.policy("v1"), "mesh.star": SYNTAX_ERROR})
    other = plane.restarted(subdir="deploy/policy", entry="root.star")
    result = other.reconcile()
    assert result.outcome == "released" and result.release is not None
    bundle = decode_bundle(other.ledger.bundle(result.release.bundle))
    assert (bundle.source.commit, bundle.source.path) == (tip, "root.star")


def test_an_identical_digest_issues_nothing(plane: Plane, h: Any) -> None:
    good_tip = h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    first = plane.reconcile().release
    assert first is not None
    h.commit(plane.repo, {"mesh.star": SYNTAX_ERROR})
    assert plane.reconcile().outcome == "rejected"
    h.git(plane.repo, "reset", "-q", "--hard", good_tip)  # the bad commit is dropped from the branch
    same = plane.reconcile()
    assert same.outcome == "unchanged-digest" and same.digest == first.bundle and same.release == first
    assert plane.ledger.current() == first and plane.ledger.high_water() == 1
    assert plane.ledger.last_commit() == good_tip
    status = plane.ledger.last_compile()
    assert status is not None and status.ok and status.digest == first.bundle


def test_a_bundle_names_its_commit_so_any_new_commit_is_a_new_release(plane: Plane, h: Any) -> None:
    """DESIGN.md: the bundle's `source.commit` is the commit, so its digest changes with
    every commit (a README, a comment); the behaviour does not, and proxies re-apply."""
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    first = plane.reconcile().release
    assert first is not None
    tip = h.commit(plane.repo, {"README.md": "who to ask about the mesh\n"})
    readme = plane.reconcile()
    assert readme.outcome == "released" and readme.release is not None
    assert (readme.release.version, readme.release.commit) == (2, tip)
    old, new = (decode_bundle(plane.ledger.bundle(r.bundle)) for r in (first, readme.release))
    assert new.spec == old.spec and new.source.commit == tip
    h.commit(plane.repo, {"mesh.star": "# the shop's mesh\n" + h.policy("v1")})
    moved = plane.reconcile()
    assert moved.outcome == "released" and moved.release is not None
    moved_bundle = decode_bundle(plane.ledger.bundle(moved.release.bundle))
    assert moved_bundle.spec.source_map != old.spec.source_map, "a comment moves the source map's lines"


def test_versions_continue_upward_after_a_restart(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    plane.reconcile()
    h.commit(plane.repo, {"mesh.star": h.policy("v2")})
    second = plane.reconcile().release
    restarted = plane.restarted()
    assert restarted.reconcile().outcome == "unchanged-commit", "the reconciled commit is persisted"
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    third = restarted.reconcile()
    assert third.outcome == "released" and third.release is not None and second is not None
    assert third.release.version == 3 and third.release.previous == second.bundle


def test_rapid_commits_coalesce_to_the_newest(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    plane.reconcile()
    h.commit(plane.repo, {"mesh.star": h.policy("v2")})
    h.commit(plane.repo, {"mesh.star": SYNTAX_ERROR})
    newest = h.commit(plane.repo, {"mesh.star": "# newest\n" + h.policy("v2")})
    result = plane.reconcile()
    assert result.outcome == "released" and result.release is not None
    assert (result.release.version, result.release.commit) == (2, newest)
    assert [r.version for r in plane.ledger.releases()] == [1, 2]


def test_a_vanished_repository_is_unavailable_not_rejected(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    plane.reconcile()
    h.commit(plane.repo, {"mesh.star": h.policy("v2")})
    moved = plane.repo.with_name("moved")
    plane.repo.rename(moved)
    result = plane.reconcile()
    assert result.outcome == "source-unavailable" and "not a Git repository" in result.detail
    status = plane.ledger.last_compile()
    assert status is not None and status.ok, "an unreadable repo is no verdict on the commit"
    moved.rename(plane.repo)
    assert plane.reconcile().outcome == "released"


# -- the half-life re-issue ----------------------------------------------------------------


def test_a_tick_reissues_the_release_at_half_life(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    first = plane.reconcile().release
    assert first is not None
    plane.reconciler.tick()
    assert plane.ledger.current() == first, "nothing to re-issue before half life"
    plane.clock.now += timedelta(days=3, hours=12)
    plane.reconciler.tick()
    current = plane.ledger.current()
    assert current is not None
    assert (current.version, current.bundle, current.reason, current.commit) == (2, first.bundle, "reissue", first.commit)
    plane.reconciler.tick()
    assert plane.ledger.high_water() == 2, "re-issued once, not on every tick"


# -- the loop ----------------------------------------------------------------------------------


def test_the_loop_releases_new_commits_on_wake_up(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})

    async def main() -> None:
        async with plane.running():
            await h.until(lambda: plane.ledger.high_water() == 1, "the first pass")
            tip = await asyncio.to_thread(h.commit, plane.repo, {"mesh.star": h.policy("v2")})
            plane.reconciler.poke()
            await h.until(lambda: plane.ledger.last_commit() == tip, "the pass after the poke")
            current = plane.ledger.current()
            assert current is not None and (current.version, current.commit) == (2, tip)

    h.run(main)


def test_wake_ups_during_a_pass_make_exactly_one_more(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    passes: list[ReconcileResult] = []
    ticks: list[int] = []
    reconciler = plane.reconciler
    reconciler.tick_interval = 0.01
    reconciler.on_result = passes.append
    plain_tick = reconciler.tick

    def counting_tick() -> None:
        ticks.append(1)
        plain_tick()

    reconciler.tick = counting_tick  # type: ignore[method-assign]

    def poke_while_compiling(phase: str) -> None:
        if phase.startswith("compiling") and len(passes) == 0:
            for _ in range(5):
                reconciler.poke()

    reconciler.on_status = poke_while_compiling

    async def main() -> None:
        async with plane.running():
            await h.until(lambda: len(passes) == 2, "the second pass")
            seen = len(ticks)
            await h.until(lambda: len(ticks) >= seen + 5, "five more ticks")
            assert [p.outcome for p in passes] == ["released", "unchanged-commit"]

    h.run(main)


def test_a_failing_pass_is_retried_with_backoff_and_the_loop_survives(
    plane: Plane, monkeypatch: pytest.MonkeyPatch, h: Any
) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    failures: list[int] = []
    put_bundle = plane.ledger.put_bundle

    def flaky_put(data: bytes) -> str:
        if len(failures) < 2:
            failures.append(1)
            raise StoreError("cannot write bundles/x: No space left on device")
        return put_bundle(data)

    monkeypatch.setattr(plane.ledger, "put_bundle", flaky_put)
    plane.reconciler.max_backoff = 0.05
    phases: list[str] = []
    plane.reconciler.on_status = phases.append

    async def main() -> None:
        async with plane.running():
            await h.until(lambda: plane.ledger.high_water() == 1, "the release after two failed passes")
            assert len(failures) == 2
            retries = [p for p in phases if p.startswith("retrying in")]
            assert len(retries) == 2 and "No space left on device" in retries[0]

    h.run(main)


def test_a_missing_branch_waits_and_a_wake_up_retries(plane: Plane, h: Any) -> None:
    async def main() -> None:
        async with plane.running():
            await h.until(lambda: plane.reconciler.phase.startswith("retrying"), "the failed first pass")
            last = plane.reconciler.last_result
            assert last is not None and last.outcome == "source-unavailable" and "no branch 'main'" in last.detail
            await asyncio.to_thread(h.commit, plane.repo, {"mesh.star": h.policy("v1")})
            plane.reconciler.poke()  # the watcher's hint cuts the backoff short
            await h.until(lambda: plane.ledger.high_water() == 1, "the release after the first commit")

    h.run(main)
