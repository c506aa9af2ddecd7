"""bench/fleet.py and bench/failover.py: smoke runs on a tiny fleet and a quick failover produce
their numbers and stop everything.

No timing is asserted; the run only has to converge, count one fetch per proxy per
release, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
STARMESH = Path(sys.executable).with_name("starmesh")


def _ha_supported() -> bool:
    text = subprocess.run([str(STARMESH), "control-plane", "--help"], capture_output=True, text=True, timeout=60).stdout
    return all(flag in text for flag in ("--store", "--replica-id", "--advertise-url"))


def _smoke(tmp_path: Path, running_with: Callable[[str], list[str]], *args: str) -> dict[str, object]:
    out = tmp_path / "fleet.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "fleet.py"), "--proxies", "5", "--releases", "2", "--idle", "0.2",
         *args, "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 5 |" in run.stdout and "fetches / (proxy·release)" in run.stdout, run.stdout
    raw: dict[str, object] = json.loads(out.read_text())
    assert not running_with("starmesh-fleet-"), "the bench left processes running"
    return raw


@pytest.mark.slow
def test_fleet_bench_on_one_replica_measures_releases_and_stops_everything(
    tmp_path: Path, running_with: Callable[[str], list[str]]
) -> None:
    raw = _smoke(tmp_path, running_with, "--replicas", "1", "--store", "file")
    (result,) = raw["results"]  # type: ignore[misc]
    assert (result["proxies"], result["replicas"], result["store"]) == (5, 1, "file")
    assert len(result["releases"]) == 2 and all(r["seconds"] > 0 and len(r["cpu"]) == 1 for r in result["releases"])
    assert result["fetches"] == 15 and result["fetches_per_proxy_release"] == 1.0  # 5 proxies, releases 1-3
    assert result["status_synced"] == 5 and result["nacks"] == 0
    assert all(mb > 0 for mb in result["rss_before_mb"] + result["rss_after_mb"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/etcd"), reason="needs etcd (apt install etcd-server)")
def test_fleet_bench_on_three_replicas_and_etcd(tmp_path: Path, running_with: Callable[[str], list[str]]) -> None:
    if not _ha_supported():
        pytest.skip("starmesh control-plane has no --replica-id/--advertise-url yet")
    raw = _smoke(tmp_path, running_with, "--replicas", "3", "--store", "etcd")
    (result,) = raw["results"]  # type: ignore[misc]
    assert (result["replicas"], result["store"]) == (3, "etcd")
    assert result["fetches_per_proxy_release"] == 1.0 and result["status_synced"] == 5
    assert result["etcd"]["rss_mb"] > 0


@pytest.mark.slow
def test_failover_bench_times_a_killed_and_a_stopped_leader_and_stops_everything(
    running_with: Callable[[str], list[str]]
) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH / "failover.py"), "--ttl", "1", "--reps", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("| 1 |"))
    kill, stop = (float(cell.split()[0]) for cell in row.strip("|").split("|")[1:3])
    assert kill > 0 and stop > 0
    assert not running_with("starmesh-failover-"), "the bench left processes running"
