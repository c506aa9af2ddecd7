"""The GitOps loop end to end: commits in a real repo reach real proxies through a real
control plane, verified and applied atomically; bad commits never do (issue 4).

Topology of every test: apps `app-v1` and `app-v2` behind two `app` proxies (versions v1
and v2, which register their inbound listeners as `app`'s endpoints), and a `front`
proxy whose outbound listener the test calls with `Host: app`. The answering app's name
(`x-app-name`) shows which version the live policy picked.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest


pytestmark = pytest.mark.slow

Fleet = Any  # tests/system/conftest.py's Fleet (a conftest cannot be imported in importlib mode)
ControlPlane = Any


def start_fleet(fleet: Fleet, cp: ControlPlane) -> tuple[object, ...]:
    app1, app2 = fleet.mesh.apps("v1", "v2")
    p1 = fleet.proxy(cp, "app", "v1", app=app1.address)
    p2 = fleet.proxy(cp, "app", "v2", app=app2.address)
    front = fleet.proxy(cp, "front", "v1")
    return app1, app2, p1, p2, front


def all_synced(cp: ControlPlane, count: int, digest: str | None = None) -> bool:
    status = cp.status()
    release = status["release"]
    assert isinstance(release, dict)
    proxies = status["proxies"]
    assert isinstance(proxies, list)
    want = digest or release["bundle"]
    live = [p for p in proxies if p["state"] != "stale"]
    return len(live) >= count and all(p["state"] == "synced" and p["bundle"] == want for p in live)


def answered_by(h: object, front: object, n: int = 20) -> Counter[str]:
    replies = h.many(front.outbound, n, host="app")  # type: ignore[attr-defined]
    return Counter(r.app if r.status == 200 else f"status {r.status} {r.error}" for r in replies)


def release_of(fleet: Fleet, cp: ControlPlane) -> dict[str, object]:
    release = fleet.wait_until(cp.release, "a release")
    assert isinstance(release, dict)
    return release


def test_a_commit_reaches_every_proxy_and_traffic_follows(fleet: Fleet, h: object) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    cp = fleet.control_plane()
    first = release_of(fleet, cp)
    *_, front = start_fleet(fleet, cp)
    fleet.wait_until(lambda: all_synced(cp, 3), "all three proxies synced")
    assert answered_by(h, front) == Counter({"v1": 20})

    commit = fleet.commit(fleet.policy(v1=0, v2=100), "all to v2")
    second = fleet.wait_until(lambda: (r := cp.release()) and r["version"] > first["version"] and r, "a second release")
    assert isinstance(second, dict) and second["commit"] == commit
    fleet.wait_until(lambda: all_synced(cp, 3, str(second["bundle"])), "all proxies on the second release")
    assert front.config()["release_version"] == second["version"]  # type: ignore[attr-defined]
    assert front.config()["origin"] == "control-plane"  # type: ignore[attr-defined]
    assert answered_by(h, front) == Counter({"v2": 20})


@pytest.mark.parametrize(
    ("broken", "finding"),
    [
        ('http_route("app", rules = [rule(backends = {"v1": 100)])\n', "SM1"),  # syntax error
        ('http_route("app", rules = [rule(backends = {"v9": 100})])\n', "SM"),  # unknown version
        (
            'http_route("app", rules = [rule(backends = {"v1": 100})])\n'
            'request_test("goes to v2", service = "app", backends = "v2")\n',
            "SM501",
        ),  # a failing golden request
    ],
    ids=["syntax-error", "lint-error", "failing-golden-request"],
)
def test_a_bad_commit_is_never_released_and_a_fix_is(fleet: Fleet, h: object, broken: str, finding: str) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    cp = fleet.control_plane()
    good = release_of(fleet, cp)
    *_, front = start_fleet(fleet, cp)
    fleet.wait_until(lambda: all_synced(cp, 3), "proxies synced")

    head = fleet.policy(v1=100, v2=0).split("http_route")[0]
    bad = fleet.commit(head + broken, "broken")

    def rejected() -> dict[str, object] | None:
        last = cp.status()["last_compile"]
        return last if isinstance(last, dict) and last["commit"] == bad and last["ok"] is False else None

    last = fleet.wait_until(rejected, "the bad commit rejected in /v1/status")
    assert isinstance(last, dict)
    diagnostics = last["diagnostics"]
    assert isinstance(diagnostics, list) and diagnostics
    assert any(str(d.get("code", "")).startswith(finding) and d.get("file") == "mesh.star" and d.get("line") for d in diagnostics), diagnostics
    assert cp.release() == good  # no release
    assert answered_by(h, front) == Counter({"v1": 20})  # the old config serves

    fixed = fleet.commit(fleet.policy(v1=0, v2=100), "fixed")
    release = fleet.wait_until(lambda: (r := cp.release()) and r["commit"] == fixed and r, "the fix released")
    assert isinstance(release, dict) and release["version"] > good["version"]
    fleet.wait_until(lambda: all_synced(cp, 3, str(release["bundle"])), "the fix on every proxy")
    assert answered_by(h, front) == Counter({"v2": 20})


def test_ten_commits_under_continuous_traffic_fail_no_request(fleet: Fleet, h: object) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    cp = fleet.control_plane()
    release_of(fleet, cp)
    *_, front = start_fleet(fleet, cp)
    fleet.wait_until(lambda: all_synced(cp, 3), "proxies synced")

    with fleet.traffic(h, front) as outcomes:
        weights = [(0, 100), (50, 50), (100, 0), (10, 90), (90, 10), (0, 100), (30, 70), (100, 0), (60, 40), (0, 100)]
        for i, (v1, v2) in enumerate(weights):
            commit = fleet.commit(fleet.policy(v1=v1, v2=v2), f"commit {i}")
            release = fleet.wait_until(lambda: (r := cp.release()) and r["commit"] == commit and r, f"commit {i} released")
            assert isinstance(release, dict)
            fleet.wait_until(lambda: all_synced(cp, 3, str(release["bundle"])), f"commit {i} on every proxy")
    assert outcomes["ok"] > 100
    assert set(outcomes) == {"ok"}, outcomes
    assert answered_by(h, front) == Counter({"v2": 20})


def test_traffic_survives_a_killed_control_plane_and_versions_continue(fleet: Fleet, h: object) -> None:
    staged = 'rollout(canary_percent = 50, bake = "2s", max_failures = 1)'
    fleet.commit(fleet.policy(v1=100, v2=0, rollout=staged))
    cp = fleet.control_plane()
    first = release_of(fleet, cp)
    *_, front = start_fleet(fleet, cp)
    fleet.wait_until(lambda: all_synced(cp, 3), "proxies synced")

    fleet.commit(fleet.policy(v1=0, v2=100, rollout=staged), "staged")
    second = fleet.wait_until(lambda: (r := cp.release()) and r["version"] > first["version"] and r, "the staged release")
    assert isinstance(second, dict)
    cp.process.popen.kill()  # mid-rollout: canaries have it, the rest do not
    cp.process.popen.wait(10)
    for _ in range(5):
        assert all(r.status == 200 for r in h.many(front.outbound, 10, host="app"))  # type: ignore[attr-defined]
        time.sleep(0.2)

    again = fleet.control_plane(listen=cp.address)  # proxies know this address
    fleet.wait_until(lambda: all_synced(again, 3, str(second["bundle"])), "the fleet converged after the restart", 60)
    commit = fleet.commit(fleet.policy(v1=50, v2=50, rollout=staged), "after the restart")
    third = fleet.wait_until(lambda: (r := again.release()) and r["commit"] == commit and r, "a release after the restart")
    assert isinstance(third, dict) and third["version"] > second["version"]
    fleet.wait_until(lambda: all_synced(again, 3, str(third["bundle"])), "the fleet on the new release", 60)


def test_a_restarted_proxy_starts_from_last_known_good_with_the_control_plane_down(fleet: Fleet, h: object) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    cp = fleet.control_plane()
    release = release_of(fleet, cp)
    app1 = fleet.mesh.app("v1")
    proxy = fleet.proxy(cp, "app", "v1", app=app1.address)
    fleet.wait_until(lambda: proxy.config()["release_version"] == release["version"], "the proxy applied the release")
    assert cp.process.stop() == 0
    assert proxy.process.stop() == 0

    restarted = fleet.proxy(cp, "app", "v1", app=app1.address, state=proxy.state_dir)
    config = restarted.config()
    assert config["origin"] == "last-known-good"
    assert config["bundle"] == release["bundle"] and config["release_version"] == release["version"]
    assert h.call(restarted.inbound, "/hello", host="app").app == "v1"  # type: ignore[attr-defined]

    empty = fleet.proxy(cp, "app", "v1", app=app1.address, wait_ready=False)
    time.sleep(1.0)  # it keeps trying the control plane; it must not become ready
    assert not empty.ready()
    reply = h.call(empty.outbound, "/", host="app")  # type: ignore[attr-defined]
    assert (reply.status, reply.error) == (503, "not-ready")


def test_a_staged_rollout_halts_on_a_nack_and_rolls_back(fleet: Fleet, h: object, tmp_path: Path) -> None:
    # A key rotation half done: the new control-plane key is trusted by two proxies and
    # not by the third, which NACKs every release signed with it.
    staged = 'rollout(canary_percent = 100, bake = "1s", max_failures = 0)'
    fleet.commit(fleet.policy(v1=100, v2=0, rollout=staged))
    cp = fleet.control_plane()
    first = release_of(fleet, cp)
    app1, app2 = fleet.mesh.apps("v1", "v2")
    rotated = tmp_path / "rotated"
    subprocess.run([sys.executable, "-m", "starmesh.cli", "keygen", "--out", str(rotated)], check=True, timeout=60)
    both = [fleet.public, rotated / "signing.pub"]
    fleet.proxy(cp, "app", "v1", app=app1.address, trust=both)
    fleet.proxy(cp, "app", "v2", app=app2.address, trust=both)
    front = fleet.proxy(cp, "front", "v1", trust=[fleet.public])
    fleet.wait_until(lambda: all_synced(cp, 3), "proxies synced")

    assert cp.process.stop() == 0
    cp = fleet.control_plane(key=rotated / "signing.key", listen=cp.address)
    fleet.commit(fleet.policy(v1=0, v2=100, rollout=staged), "signed with the new key")

    def halted() -> dict[str, object] | None:
        rollout = cp.status().get("rollout")
        return rollout if isinstance(rollout, dict) and rollout.get("halted") else None

    rollout = fleet.wait_until(halted, "the rollout halted", 60)
    assert isinstance(rollout, dict)
    release = cp.release()
    assert isinstance(release, dict) and release["bundle"] == first["bundle"] and release["version"] >= 3
    front_status = next(p for p in cp.status()["proxies"] if p["service"] == "front")  # type: ignore[union-attr]
    assert front_status["error"] and "key" in str(front_status["error"]).lower()
    # Every proxy serves the first policy: two re-applied it, the third never left it.
    fleet.wait_until(lambda: answered_by(h, front) == Counter({"v1": 20}), "traffic on the first policy")


def test_rollback_by_git_revert_and_by_starmesh_rollback(fleet: Fleet, h: object) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    cp = fleet.control_plane()
    first = release_of(fleet, cp)
    *_, front = start_fleet(fleet, cp)
    commit = fleet.commit(fleet.policy(v1=0, v2=100), "to v2")
    second = fleet.wait_until(lambda: (r := cp.release()) and r["commit"] == commit and r, "the v2 release")
    assert isinstance(second, dict)
    fleet.wait_until(lambda: all_synced(cp, 3, str(second["bundle"])), "v2 everywhere")

    fleet.git(fleet.repo, "revert", "--no-edit", "HEAD")
    reverted = fleet.git(fleet.repo, "rev-parse", "HEAD")
    third = fleet.wait_until(lambda: (r := cp.release()) and r["commit"] == reverted and r, "the revert released")
    assert isinstance(third, dict) and third["version"] > second["version"]
    fleet.wait_until(lambda: all_synced(cp, 3, str(third["bundle"])), "the revert everywhere")
    assert answered_by(h, front) == Counter({"v1": 20})

    out = subprocess.run(
        [sys.executable, "-m", "starmesh.cli", "rollback", "--control-plane", cp.url, "--to", str(second["bundle"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    fourth = fleet.wait_until(lambda: (r := cp.release()) and r["version"] > third["version"] and r, "the rollback release")
    assert isinstance(fourth, dict) and fourth["bundle"] == second["bundle"]
    fleet.wait_until(lambda: all_synced(cp, 3, str(second["bundle"])), "the rollback everywhere")
    assert answered_by(h, front) == Counter({"v2": 20})
    assert first["version"] < second["version"] < third["version"] < fourth["version"]
