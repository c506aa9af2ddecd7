"""Failover benchmark: how long the control plane has no leader when its leader goes (issue 9).

    .venv/bin/python bench/failover.py                    # --leader-ttl 2 and 10, 3 kills and 3 stops each
    .venv/bin/python bench/failover.py --ttl 10 --reps 5

Three `starmesh control-plane --store etcd://...` replicas share one real etcd (Debian's
/usr/bin/etcd on loopback ports, its data in a temp dir) and follow a one-commit policy
repository. For each `--leader-ttl`, each repetition takes the current leader away and
times, from just before the signal, until another replica prints `role leader` (what it
prints once it has won the election and started its reconcile loop):

- kill: SIGKILL, as a crash or a lost node: the new leader waits for the old lease to
  expire, so this is about the ttl;
- stop: SIGTERM, as a rolling update: the old leader resigns (deletes its key, revokes its
  lease) and another takes over at once.

The replica taken away is started again (same id and port) before the next repetition.
Every wait is bounded; every process is stopped at the end. Prints the medians and ranges
as a Markdown table, with the machine.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _children import BenchError, Children, free_port, policy_repo, start_etcd, starmesh  # noqa: E402
from _machine import machine  # noqa: E402  (bench/ is a folder of scripts, not a package)

POLICY = """\
mesh(name = "failover", mtls = "disable")

service(name = "app", versions = ["v1"])
"""

START_TIMEOUT = 60.0
TAKEOVER_TIMEOUT = 120.0


@dataclass
class Replica:
    """One replica: its id and port stay when it is started again; its process and log change."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)


def _lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _start(children: Children, work: Path, repo: Path, store: str, ttl: float, replica: Replica) -> None:
    """Start (or start again) one replica; its log's existing lines are kept and counted past."""
    proc, log = children.start(f"{replica.name}-{len(children.procs)}", [
        *starmesh(), "control-plane", "--repo", str(repo), "--key", str(work / "keys" / "signing.key"),
        "--state-dir", str(work / replica.name), "--listen", f"127.0.0.1:{replica.port}", "--store", store,
        "--replica-id", replica.name, "--leader-ttl", f"{ttl:g}", "--advertise-url", f"http://127.0.0.1:{replica.port}",
    ])  # fmt: skip
    replica.proc, replica.log = proc, log
    end = time.monotonic() + START_TIMEOUT
    while not any(line.startswith("ready ") or line.startswith("role ") for line in _lines(log)):
        if proc.poll() is not None or time.monotonic() > end:
            raise BenchError(f"{replica.name} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)


def _leader(replicas: list[Replica]) -> Replica:
    """The replica whose last role line says it leads (waiting for one)."""
    end = time.monotonic() + TAKEOVER_TIMEOUT
    while time.monotonic() < end:
        for replica in replicas:
            roles = [line for line in _lines(replica.log) if line.startswith("role ")]
            if roles and roles[-1] == "role leader":
                return replica
        time.sleep(0.02)
    raise BenchError("no replica became leader")


def _takeover(replicas: list[Replica], gone: Replica, seen: dict[str, int], start: float) -> float:
    """Seconds from `start` until a replica other than `gone` prints a new `role leader` line."""
    end = start + TAKEOVER_TIMEOUT
    while time.monotonic() < end:
        for replica in replicas:
            if replica is gone:
                continue
            lines = _lines(replica.log)
            if "role leader" in lines[seen[replica.name]:]:
                return time.monotonic() - start
        time.sleep(0.01)
    raise BenchError(f"no replica took over from {gone.name} within {TAKEOVER_TIMEOUT:.0f}s")


def measure(ttl: float, reps: int) -> dict[str, list[float]]:
    """For one ttl, from scratch: `reps` kills and `reps` stops of the leader; seconds each."""
    times: dict[str, list[float]] = {"kill": [], "stop": []}
    with tempfile.TemporaryDirectory(prefix="starmesh-failover-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            repo = policy_repo(work, POLICY)
            store, _ = start_etcd(children, work, START_TIMEOUT)
            replicas = [Replica(f"r{i}", free_port()) for i in (1, 2, 3)]
            for replica in replicas:
                _start(children, work, repo, store, ttl, replica)
            for how in ("kill", "stop"):
                for _ in range(reps):
                    leader = _leader(replicas)
                    assert leader.proc is not None
                    time.sleep(ttl / 2)  # a settled leader, a keepalive or two behind it
                    seen = {r.name: len(_lines(r.log)) for r in replicas}
                    start = time.monotonic()
                    leader.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
                    times[how].append(_takeover(replicas, leader, seen, start))
                    leader.proc.wait(30)
                    _start(children, work, repo, store, ttl, leader)
        finally:
            children.stop_all()
    return times


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttl", type=float, nargs="+", default=[2.0, 10.0], help="--leader-ttl values (default 2 10)")
    parser.add_argument("--reps", type=int, default=3, help="kills and stops per ttl (default 3)")
    args = parser.parse_args(argv)
    if args.reps < 1 or min(args.ttl) < 1:
        parser.error("--reps must be at least 1 and every --ttl at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the children
    print(f"machine: {machine()}")
    rows = []
    try:
        for ttl in args.ttl:
            times = measure(ttl, args.reps)
            print(f"--leader-ttl {ttl:g}: kill {[round(t, 2) for t in times['kill']]}, stop {[round(t, 2) for t in times['stop']]}")
            rows.append(f"| {ttl:g} | {_cell(times['kill'])} | {_cell(times['stop'])} |")
    except BenchError as exc:
        print(f"failover bench failed: {exc}", file=sys.stderr)
        return 1
    print("\n| --leader-ttl, s | leader killed (SIGKILL): s to a new leader, median (range) | leader stopped (SIGTERM) |")
    print("|---:|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
