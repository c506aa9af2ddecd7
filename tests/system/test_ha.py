"""High availability end to end (issue 9): three control-plane replicas on a real etcd, real
proxies failing over between them, traffic through the data plane the whole time.

Topology as in test_gitops.py: `app` v1 and v2 proxies in front of their apps, a `front`
proxy the test calls with `Host: app`. Every proxy is given all the replicas' URLs, each
in another order, so they spread over the replicas (and the ones on a killed replica
must fail over). Replicas run with `--leader-ttl 2`, so a killed leader is replaced
within seconds; every wait is bounded, none is an assertion about speed.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
from collections.abc import Sequence
from typing import Any

import pytest

pytestmark = pytest.mark.slow

Fleet = Any  # tests/system/conftest.py's Fleet (a conftest cannot be imported in importlib mode)
ControlPlane = Any
Etcd = Any  # tests/conftest.py's EtcdServer

STAGED = 'rollout(canary_percent = 34, bake = "4s", max_failures = 0)'


def replica(fleet: Fleet, etcd: Etcd, name: str, listen: str = "127.0.0.1:0") -> ControlPlane:
    """A replica of the control plane on `etcd`, with a state dir of its own (its Git mirror)."""
    extra = ["--store", etcd.url, "--replica-id", name, "--leader-ttl", "2"]
    return fleet.control_plane(extra, listen=listen, state_dir=fleet.tmp_path / f"state-{name}")


def try_status(cp: ControlPlane) -> dict[str, Any] | None:
    try:
        return cp.status()  # type: ignore[no-any-return]
    except (urllib.error.URLError, OSError):
        return None


def leader_id(planes: Sequence[ControlPlane]) -> str | None:
    """The leader every answering replica agrees on, or None while they do not."""
    seen = set()
    for cp in planes:
        status = try_status(cp)
        if status is None:
            continue
        leader = status["control_plane"]["leader"]
        seen.add(None if leader is None else leader["id"])
    return seen.pop() if len(seen) == 1 else None


def synced(cp: ControlPlane, count: int, bundle: str) -> bool:
    status = try_status(cp)
    if status is None:
        return False
    live = [p for p in status["proxies"] if p["state"] != "stale"]
    return len(live) >= count and all(p["state"] == "synced" and p["bundle"] == bundle for p in live)


def start_proxies(fleet: Fleet, planes: Sequence[ControlPlane]) -> tuple[Any, ...]:
    """app v1, app v2 and front, each with every replica's URL, starting from another one."""
    app1, app2 = fleet.mesh.apps("v1", "v2")
    rotated = [list(planes[i:]) + list(planes[:i]) for i in range(len(planes))]
    p1 = fleet.proxy(rotated[0], "app", "v1", app=app1.address)
    p2 = fleet.proxy(rotated[1 % len(planes)], "app", "v2", app=app2.address)
    front = fleet.proxy(rotated[2 % len(planes)], "front", "v1")
    return p1, p2, front


def test_a_killed_leader_mid_rollout_is_replaced_and_the_rollout_finishes(fleet: Fleet, etcd_server: Etcd, h: object) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0, rollout=STAGED))
    planes = [replica(fleet, etcd_server, "r1")]
    planes[0].process.first_line(lambda line: line == "role leader", "r1 leading")
    planes += [replica(fleet, etcd_server, "r2"), replica(fleet, etcd_server, "r3")]
    first = fleet.wait_until(lambda: all((s := try_status(cp)) and s["release"] for cp in planes) and planes[2].release(),
                             "every replica serving the first release")  # fmt: skip
    assert fleet.wait_until(lambda: leader_id(planes), "one leader") == "r1"
    *_, front = start_proxies(fleet, planes)
    fleet.wait_until(lambda: synced(planes[1], 3, first["bundle"]), "three proxies synced")
    replicas = planes[2].status()["control_plane"]["replicas"]
    assert sorted(r["id"] for r in replicas) == ["r1", "r2", "r3"]

    with fleet.traffic(h, front) as outcomes:
        fleet.commit(fleet.policy(v1=0, v2=100, rollout=STAGED), "all to v2, staged")

        def baking() -> dict[str, Any] | None:
            rollout = planes[1].status()["rollout"]
            return rollout if rollout["version"] > first["version"] and rollout["phase"] == "baking" else None

        staged = fleet.wait_until(baking, "the staged release baking on its canary", 60)
        planes[0].process.kill()  # SIGKILL: no resignation, the lease has to run out
        planes[0].process.popen.wait(10)
        survivors = planes[1:]
        new_leader = fleet.wait_until(lambda: (lid := leader_id(survivors)) not in (None, "r1") and lid, "a new leader", 60)
        assert new_leader in ("r2", "r3")

        def completed() -> dict[str, Any] | None:
            status = try_status(survivors[0])
            rollout = None if status is None else status["rollout"]
            return rollout if rollout and rollout["version"] == staged["version"] and rollout["phase"] == "complete" else None

        fleet.wait_until(completed, "the new leader finishing the rollout", 60)
        fleet.wait_until(lambda: synced(survivors[1], 3, staged["bundle"]), "every proxy on the staged release", 60)
        commit = fleet.commit(fleet.policy(v1=50, v2=50, rollout=STAGED), "after the failover")
        third = fleet.wait_until(lambda: (r := survivors[0].release()) and r["commit"] == commit and r, "a release by the new leader", 60)
        assert third["version"] > staged["version"]
        fleet.wait_until(lambda: synced(survivors[0], 3, third["bundle"]), "every proxy on the new leader's release", 90)
        time.sleep(0.5)  # a little more traffic on the final release
    assert outcomes["ok"] > 50
    assert set(outcomes) == {"ok"}, outcomes


def test_with_etcd_down_the_replicas_serve_read_only_and_catch_up_after(
    fleet: Fleet, etcd_server: Etcd, h: object
) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    planes = [replica(fleet, etcd_server, "r1")]
    planes[0].process.first_line(lambda line: line == "role leader", "r1 leading")
    planes.append(replica(fleet, etcd_server, "r2"))
    first = fleet.wait_until(lambda: planes[1].release(), "the follower serving the release")
    *_, front = start_proxies(fleet, planes)
    fleet.wait_until(lambda: synced(planes[1], 3, first["bundle"]), "three proxies synced")

    etcd_server.kill()
    for cp in planes:
        store = fleet.wait_until(lambda cp=cp: (s := try_status(cp)) and s["control_plane"]["store"]["read_only"] and s["control_plane"]["store"],
                                 f"{cp.address} saying it is read-only", 30)  # fmt: skip
        assert store["available"] is False and store["since"] and store["error"]
        assert cp.release() == first  # still served, from the replica's copy
    fleet.wait_until(lambda: all(try_status(cp)["control_plane"]["role"] == "follower" for cp in planes),
                     "the leader stepping down without etcd", 30)  # fmt: skip
    commit = fleet.commit(fleet.policy(v1=0, v2=100), "while etcd is down")
    assert all(r.status == 200 for r in h.many(front.outbound, 20, host="app"))  # type: ignore[attr-defined]
    assert all(cp.release() == first for cp in planes)  # nobody can publish

    etcd_server.start()
    fleet.wait_until(lambda: leader_id(planes), "a leader again", 60)
    second = fleet.wait_until(lambda: (r := planes[1].release()) and r["commit"] == commit and r, "the waiting commit released", 60)
    assert second["version"] > first["version"]
    assert planes[0].status()["control_plane"]["store"]["read_only"] is False
    fleet.wait_until(lambda: synced(planes[0], 3, second["bundle"]), "every proxy on it", 60)


def test_everything_restarted_keeps_the_state(fleet: Fleet, etcd_server: Etcd, h: object) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    planes = [replica(fleet, etcd_server, "r1")]
    planes[0].process.first_line(lambda line: line == "role leader", "r1 leading")
    planes.append(replica(fleet, etcd_server, "r2"))
    first = fleet.wait_until(lambda: planes[1].release(), "the first release")
    app2 = fleet.mesh.app("v2")
    proxy = fleet.proxy(planes[::-1], "app", "v2", app=app2.address)
    commit = fleet.commit(fleet.policy(v1=0, v2=100), "second")
    second = fleet.wait_until(lambda: (r := planes[1].release()) and r["commit"] == commit and r, "the second release")
    fleet.wait_until(lambda: synced(planes[0], 1, second["bundle"]), "the proxy on the second release")
    addresses = [cp.address for cp in planes]
    assert proxy.process.stop() == 0
    for cp in planes:
        assert cp.process.stop() == 0
    etcd_server.stop()

    etcd_server.start()
    again = [replica(fleet, etcd_server, name, listen=address) for name, address in zip(("r2", "r1"), addresses[::-1])]
    fleet.wait_until(lambda: leader_id(again), "a leader after the restart", 60)
    for cp in again:
        assert fleet.wait_until(cp.release, "the release after the restart") == second
    status = again[0].status()
    assert status["rollout"]["phase"] == "complete" and status["rollout"]["version"] == second["version"]
    assert first["version"] < second["version"]
    restarted = fleet.proxy(again, "app", "v2", app=app2.address, state=proxy.state_dir)
    assert restarted.config()["release_version"] == second["version"]  # its last-known-good, then the same release
    assert h.call(restarted.inbound, "/hello", host="app").app == "v2"  # type: ignore[attr-defined]
    commit = fleet.commit(fleet.policy(v1=50, v2=50), "third")
    third = fleet.wait_until(lambda: (r := again[1].release()) and r["commit"] == commit and r, "a release after the restart", 60)
    assert third["version"] == second["version"] + 1
    fleet.wait_until(lambda: synced(again[0], 1, third["bundle"]), "the restarted proxy on the third release", 60)


def test_a_rollback_sent_to_a_follower_is_signed_by_the_leader(fleet: Fleet, etcd_server: Etcd) -> None:
    fleet.commit(fleet.policy(v1=100, v2=0))
    planes = [replica(fleet, etcd_server, "r1")]
    planes[0].process.first_line(lambda line: line == "role leader", "r1 leading")
    planes.append(replica(fleet, etcd_server, "r2"))
    first = fleet.wait_until(lambda: planes[1].release(), "the first release")
    commit = fleet.commit(fleet.policy(v1=0, v2=100), "second")
    second = fleet.wait_until(lambda: (r := planes[1].release()) and r["commit"] == commit and r, "the second release")
    assert planes[1].status()["control_plane"]["role"] == "follower"

    argv = [sys.executable, "-m", "starmesh.cli", "rollback", "--control-plane", planes[1].url, "--to", first["bundle"]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rolled = fleet.wait_until(lambda: (r := planes[0].release()) and r["version"] > second["version"] and r, "the rollback")
    assert rolled["bundle"] == first["bundle"] and rolled["reason"] == "rollback"
    assert fleet.wait_until(lambda: planes[1].release() == rolled and rolled, "the follower serving it")

    planes[0].process.kill()  # no leader for a moment: a rollback to the follower is refused, saying why
    planes[0].process.popen.wait(10)
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if refused.returncode != 0:  # unless r2 already took over (then it signs it itself)
        assert "leader" in refused.stderr, refused.stderr
