"""`starmesh rollback` with control-plane replicas: real replicas on a real etcd.

    starmesh rollback --control-plane A --control-plane B --to <old bundle>
        A: a closed port ─✗─► B: follower r2 ──forwards──► leader r1 signs release 3
        then r1 is killed; r2 takes over (lease expiry)
        A: r1's URL (dead) ─✗─► B: r2, now leading, signs release 4

The replicas are `starmesh control-plane --store` processes (tests/cli/conftest.py's
`control_planes`) on tests/conftest.py's `etcd_server`; the test skips while the command
has no HA options. A 503 from a replica that cannot act, and answers that are final,
are in test_status_rollback.py (fake servers beside a real control plane).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.main import main

DEADLINE = 30.0  # seconds; a bound on waiting for a condition, never an assertion about speed
STARMESH = Path(sys.executable).with_name("starmesh")

POLICY = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None, "NO_PROXY": "*", "no_proxy": "*"})


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _has_ha_options() -> bool:
    shown = subprocess.run([str(STARMESH), "control-plane", "--help"], capture_output=True, text=True, timeout=DEADLINE)
    return all(option in shown.stdout for option in ("--store", "--replica-id", "--leader-ttl"))


def role(document: dict[str, Any]) -> str | None:
    """The answering replica's role in a status document."""
    found: str | None = (document.get("control_plane") or {}).get("role")
    return found


def test_rollback_through_a_follower_and_after_the_leader_died(
    runner: CliRunner, tmp_path: Path, control_planes: Any, h: Any, etcd_server: Any
) -> None:
    if not _has_ha_options():
        pytest.skip("starmesh control-plane has no --replica-id/--leader-ttl yet (HA wiring, issue 9)")
    repo = h.make_repo(tmp_path / "repo")
    h.commit(repo, POLICY.format(v1=100, v2=0), "all to v1")
    key, _ = generate_keypair(tmp_path / "keys")
    planes = []
    for rid in ("r1", "r2"):
        plane = control_planes.start([
            "--repo", str(repo), "--key", str(key), "--state-dir", str(tmp_path / rid), "--listen", "127.0.0.1:0",
            "--store", etcd_server.url, "--replica-id", rid, "--leader-ttl", "2",
        ])  # fmt: skip
        plane.wait_listening()
        planes.append(plane)
        if rid == "r1":
            plane.wait_status(lambda d: role(d) == "leader" and (d["release"] or {}).get("version") == 1, "r1 leading release 1")
    leader, follower = planes
    follower.wait_status(lambda d: role(d) == "follower" and (d["release"] or {}).get("version") == 1, "r2 following release 1")
    old = follower.status()["release"]["bundle"]
    h.commit(repo, POLICY.format(v1=0, v2=100), "all to v2")
    newer = follower.wait_status(lambda d: d["release"]["version"] == 2, "release 2 on r2")["release"]["bundle"]
    assert newer != old

    # A dead URL first, then the follower: it forwards to the leader, which signs release 3.
    down = f"http://127.0.0.1:{closed_port()}"
    result = run(runner, "rollback", "--control-plane", down, "--control-plane", follower.url, "--to", old)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"release 3 now serves {old}"
    assert result.stderr.startswith(f"starmesh: warning: skipped: cannot reach the control plane at {down}/v1/rollback: ")
    release = leader.status()["release"]  # the leader signed it
    assert (release["version"], release["bundle"]) == (3, old)

    # The leader dies; once r2 leads, a rollback naming the dead leader first still works.
    leader.process.kill()
    follower.wait_status(lambda d: role(d) == "leader", "r2 leading after r1 was killed")
    result = run(runner, "rollback", "--control-plane", leader.url, "--control-plane", follower.url, "--to", newer)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"release 4 now serves {newer}"
    assert re.match(rf"starmesh: warning: skipped: cannot reach the control plane at {re.escape(leader.url)}/v1/rollback: ",
                    result.stderr)
    assert follower.status()["release"]["version"] == 4
