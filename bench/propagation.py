"""Propagation benchmark: a commit to the policy repo until every proxy has applied it.

    .venv/bin/python bench/propagation.py                    # 50 proxies, 5 commits
    .venv/bin/python bench/propagation.py --proxies 10 --commits 3 --json out.json

One local Git repository, one `starmesh control-plane` watching it, and N `starmesh
proxy` processes in the control-plane form (all of service `app`, each its own
process and state dir, like N app instances on one host). Each measured commit changes
the policy's weights (a new bundle digest); the clock starts just before `git commit`
and stops when `/v1/status` shows every proxy `synced` on the release of that commit,
i.e. after each proxy verified the release, fetched and checked the bundle, built and
swapped its table, persisted last-known-good and ACKed. Polled every 10 ms.

Reported: the median, min and max over the commits, and where one commit's time goes
(from the control plane's log: compile, and the first and last ACK). DESIGN.md budget:
commit to all 50 local proxies applied in < 3 s.

Every process is started in its own process group and stopped at the end, on errors
and on Ctrl-C too. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _children import BenchError, Children, git, policy_repo, starmesh, wait_line  # noqa: E402
from _machine import machine  # noqa: E402  (bench/ is a folder of scripts, not a package)

__all__ = ["main", "run"]

POLICY = """\
mesh(name = "bench", mtls = "disable")

service(name = "app", versions = ["v1", "v2"])

http_route("app", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""

START_TIMEOUT = 120.0
SYNC_TIMEOUT = 60.0


def _status(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/v1/status", timeout=10) as answer:
        data = json.loads(answer.read())
    if not isinstance(data, dict):
        raise BenchError("/v1/status did not answer a JSON object")
    return data


def _synced(status: dict[str, object], count: int, commit: str) -> bool:
    release = status.get("release")
    proxies = status.get("proxies")
    if not isinstance(release, dict) or release.get("commit") != commit or not isinstance(proxies, list):
        return False
    live = [p for p in proxies if isinstance(p, dict) and p.get("state") != "stale"]
    return len(live) >= count and all(p.get("state") == "synced" and p.get("bundle") == release.get("bundle") for p in live)


def _wait_synced(url: str, count: int, commit: str, timeout: float = SYNC_TIMEOUT) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if _synced(_status(url), count, commit):
                return time.monotonic()
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.01)
    raise BenchError(f"the fleet did not converge on commit {commit[:12]} within {timeout:.0f}s")


def run(proxies: int, commits: int) -> list[float]:
    """Start everything, measure `commits` commits, stop everything; seconds per commit."""
    with tempfile.TemporaryDirectory(prefix="starmesh-propagation-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            repo = policy_repo(work, POLICY.format(v1=100, v2=0))
            cp, cp_log = children.start("control-plane", [
                *starmesh(), "control-plane", "--repo", str(repo), "--key", str(work / "keys" / "signing.key"),
                "--state-dir", str(work / "cp"), "--listen", "127.0.0.1:0", "--proxy-ttl", "30",
            ])  # fmt: skip
            url = "http://" + wait_line(cp_log, cp, "listening ", START_TIMEOUT).split()[1]
            wait_line(cp_log, cp, "ready ", START_TIMEOUT)
            print(f"control plane at {url}; starting {proxies} proxies", flush=True)
            started = []
            for i in range(proxies):
                proc, log = children.start(f"proxy-{i}", [
                    *starmesh(), "proxy", "--service", "app", "--version", "v1", "--app", "127.0.0.1:9",
                    "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                    "--state-dir", str(work / f"proxy-{i}"), "--control-plane", url,
                    "--trust", str(work / "keys" / "signing.pub"),
                ])  # fmt: skip
                started.append((proc, log))
            for proc, log in started:
                wait_line(log, proc, "admin ", START_TIMEOUT)
            first = git(repo, "rev-parse", "HEAD")
            _wait_synced(url, proxies, first, START_TIMEOUT)
            print(f"{proxies} proxies synced; measuring {commits} commits", flush=True)
            times = []
            for i in range(commits):
                v2 = 10 * (i % 9 + 1)
                (repo / "mesh.star").write_text(POLICY.format(v1=100 - v2, v2=v2))
                git(repo, "add", "-A")
                start = time.monotonic()
                git(repo, "commit", "-q", "-m", f"weights {100 - v2}/{v2}")
                commit = git(repo, "rev-parse", "HEAD")
                seconds = _wait_synced(url, proxies, commit) - start
                times.append(seconds)
                print(f"commit {i + 1}/{commits}: all {proxies} proxies applied in {seconds:.2f} s", flush=True)
                time.sleep(0.5)
            return times
        finally:
            children.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=50, help="proxy processes (default 50)")
    parser.add_argument("--commits", type=int, default=5, help="measured commits (default 5)")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if args.proxies < 1 or args.commits < 1:
        parser.error("--proxies and --commits must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the children
    print(f"machine: {machine()}", flush=True)
    try:
        times = run(args.proxies, args.commits)
    except BenchError as exc:
        print(f"propagation bench failed: {exc}", file=sys.stderr)
        return 1
    median = statistics.median(times)
    print(
        f"\ncommit to all {args.proxies} proxies applied: median {median:.2f} s, min {min(times):.2f} s, "
        f"max {max(times):.2f} s over {len(times)} commits (budget < 3 s: {'met' if median < 3 else 'MISSED'})"
    )
    if args.json:
        args.json.write_text(json.dumps({"proxies": args.proxies, "seconds": times, "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
