"""`starmesh rollback` with control-plane replicas: real replicas on a real etcd.

    starmesh rollback --control-plane A --control-plane B --to <old bundle>
        A: a closed port ─✗─► B: follower r2 ──forwards──► leader r1 signs release 3
        then r1 is killed; r2 takes over (lease expiry)
        A: r1's URL (dead) ─✗─► B: r2, now leading, signs release 4

The replicas are `starmesh control-plane --store` processes (tests/cli/conftest.py's
`control_planes.replicas`) on tests/conftest.py's `etcd_server`. A 503 from a replica that
cannot act, and answers that are final, are in test_status_rollback.py (fake servers beside
a real control plane).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.main import main


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


def role(document: dict[str, Any]) -> str | None:
    """The answering replica's role in a status document."""
    found: str | None = (document.get("control_plane") or {}).get("role")
    return found


def test_rollback_through_a_follower_and_after_the_leader_died(
    runner: CliRunner, tmp_path: Path, control_planes: Any, h: Any, etcd_server: Any
) -> None:
    repo = h.make_repo(tmp_path / "repo")
    h.commit(repo, h.reviews(100, 0), "all to v1")
    key, _ = generate_keypair(tmp_path / "keys")
    leader, follower = control_planes.replicas(("r1", "r2"), repo=repo, key=key, store=etcd_server.url, state=tmp_path)
    leader.wait_status(lambda d: role(d) == "leader" and (d["release"] or {}).get("version") == 1, "r1 leading release 1")
    follower.wait_status(lambda d: role(d) == "follower" and (d["release"] or {}).get("version") == 1, "r2 following release 1")
    old = follower.status()["release"]["bundle"]
    h.commit(repo, h.reviews(0, 100), "all to v2")
    newer = follower.wait_status(lambda d: d["release"]["version"] == 2, "release 2 on r2")["release"]["bundle"]
    assert newer != old

    # A dead URL first, then the follower: it forwards to the leader, which signs release 3.
    down = f"http://127.0.0.1:{h.closed_port()}"
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
