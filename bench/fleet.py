"""Fleet benchmark: 100, 500 and 1,000 simulated proxies against the control plane (issue 9).

    .venv/bin/python bench/fleet.py                          # 100, 500, 1000 proxies, 3 releases each
    .venv/bin/python bench/fleet.py --proxies 1000 --releases 5 --json fleet.json
    .venv/bin/python bench/fleet.py --replicas 3 --store etcd   # three replicas on one etcd
    .venv/bin/python bench/fleet.py --replicas 1 --store file   # one replica, --state-dir only

For each N, from scratch: a Git repo in a temp dir, the control plane (one replica on
its state dir, or R replicas sharing a real etcd: Debian's /usr/bin/etcd on loopback
ports, its data in the temp dir), and N simulated proxies (runtime/fleet.py: the
control channel only) in this process, on one uvloop event loop and one connection
pool. Proxy i lists the replicas' URLs starting at replica i mod R, so the fleet
spreads evenly. Once every proxy has registered and ACKed release 1, each measured
release is a commit that changes `app`'s weights (a new bundle):

- commit to all ACK: from just before `git commit` to the last ACK the fleet saw for
  that release (the control plane answered the report), median and range;
- control-plane CPU: utime+stime (/proc/PID/stat, the replica's process group) over
  that window, per replica and in total; and, before the first commit, the idle CPU
  share the connected fleet costs (heartbeats, long-polls renewed every 30 s);
- RSS (VmRSS) per replica before the fleet and with it connected after the releases;
  memory per connected proxy = (RSS with the fleet - RSS before) / N, replicas summed;
- bundle fetches per proxy per release: every proxy must fetch every new digest once.

Targets (issue 9): 1,000 proxies converge in < 10 s; memory per connected proxy < 50 KB.
The fleet's own CPU (this process) is printed too: it shares the machine's cores.
Every process is started in its own process group and stopped at the end, on errors
and Ctrl-C too. Loopback only; plain HTTP (the fleet has no mesh certificates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from starmesh.bundle.keys import load_public_key
from starmesh.runtime.fleet import Fleet, FleetConfig, FleetError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import BenchError, Children, free_port, git, policy_repo, start_etcd, starmesh, wait_line  # noqa: E402
from _machine import machine  # noqa: E402  (bench/ is a folder of scripts, not a package)

__all__ = ["main", "run"]

POLICY = """\
mesh(name = "bench", mtls = "disable")

service(name = "app", versions = ["v1", "v2"])

# Only the simulated proxies register as `fleet`; nothing routes to it.
service(name = "fleet", versions = ["v1"])

http_route("app", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""

START_TIMEOUT = 60.0
CONVERGE_TIMEOUT = 60.0
TICKS = os.sysconf("SC_CLK_TCK")


def ha_supported() -> bool:
    """True once `starmesh control-plane` takes the HA flags (--store, --replica-id, --advertise-url)."""
    text = subprocess.run([*starmesh(), "control-plane", "--help"], capture_output=True, text=True, timeout=60).stdout
    return all(flag in text for flag in ("--store", "--replica-id", "--advertise-url"))


# -- processes ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid`'s process group: utime+stime of each live member, and cutime+cstime
    (its children waited for, e.g. git runs) of each."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields[0] is stat's 3rd field, the state
        except OSError:
            continue
        if int(fields[2]) == pid:  # pgrp
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


@dataclass
class Release:
    """One measured release: commit to the last ACK, control-plane CPU per replica, the fleet's CPU."""

    seconds: float
    cpu: list[float]
    fleet_cpu: float


@dataclass
class SizeResult:
    """Everything measured for one fleet size (the --json output, one per size)."""

    proxies: int
    replicas: int
    store: str
    connect_seconds: float
    releases: list[Release]
    idle_cpu_share: list[float]
    rss_before_mb: list[float]
    rss_after_mb: list[float]
    kb_per_proxy: float
    fetches: int
    fetches_per_proxy_release: float
    nacks: int
    failovers: int
    status_synced: int
    """The fewest `fleet` proxies any replica's /v1/status lists synced after the last release."""
    status_lag: float
    """Seconds the bench waited, a second or more after the last release's last ACK, until every
    replica's /v1/status agreed (at most 15)."""
    leader: str | None
    """The leading replica's id at the end (replicas are r1, r2, ... in URL order)."""
    etcd: dict[str, float] | None


@dataclass
class Plane:
    """The control plane under test: its replicas (and etcd), their URLs and pids."""

    urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    etcd_pid: int | None = None


def start_plane(children: Children, work: Path, repo: Path, replicas: int, store: str) -> Plane:
    """Start the control plane's replicas (sharing etcd with --store etcd) and wait until each is ready."""
    plane = Plane()
    common = ["--repo", str(repo), "--key", str(work / "keys" / "signing.key"), "--proxy-ttl", "30"]
    if store == "etcd":
        etcd_url, plane.etcd_pid = start_etcd(children, work, START_TIMEOUT)
        started = []
        for i in range(replicas):
            port = free_port()
            proc, log = children.start(f"replica-{i + 1}", [
                *starmesh(), "control-plane", *common, "--state-dir", str(work / f"cp-{i + 1}"),
                "--listen", f"127.0.0.1:{port}", "--store", etcd_url, "--replica-id", f"r{i + 1}",
                "--advertise-url", f"http://127.0.0.1:{port}",
            ])  # fmt: skip
            started.append((proc, log))
            plane.urls.append(f"http://127.0.0.1:{port}")
            plane.pids.append(proc.pid)
        for proc, log in started:
            wait_line(log, proc, "ready ", START_TIMEOUT)
        return plane
    proc, log = children.start("control-plane", [
        *starmesh(), "control-plane", *common, "--state-dir", str(work / "cp"), "--listen", "127.0.0.1:0",
    ])  # fmt: skip
    plane.urls.append("http://" + wait_line(log, proc, "listening ", START_TIMEOUT).split()[1])
    plane.pids.append(proc.pid)
    wait_line(log, proc, "ready ", START_TIMEOUT)
    return plane


def _synced_in_status(url: str) -> int:
    """How many `fleet` proxies the replica at `url` lists as synced in /v1/status."""
    with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as answer:
        data = json.loads(answer.read())
    listed = data.get("proxies") if isinstance(data, dict) else None
    if not isinstance(listed, list):
        raise BenchError(f"{url}/v1/status has no proxies list")
    return sum(1 for p in listed if isinstance(p, dict) and p.get("service") == "fleet" and p.get("state") == "synced")


def _leader(url: str) -> str | None:
    """The leader's replica id from /v1/status (None without --store)."""
    with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as answer:
        data = json.loads(answer.read())
    plane = data.get("control_plane") if isinstance(data, dict) else None
    leader = plane.get("leader") if isinstance(plane, dict) else None
    found = leader.get("id") if isinstance(leader, dict) else None
    return found if isinstance(found, str) else None


async def _status_synced(urls: list[str], size: int, timeout: float = 15.0) -> tuple[int, float]:
    """Poll every replica's /v1/status until each lists the whole fleet synced (an ACK reaches
    the other replicas through etcd); the fewest any replica lists, and how long the bench
    waited for that (bounded by `timeout`)."""
    started = time.monotonic()
    while True:
        fewest = min([await asyncio.to_thread(_synced_in_status, url) for url in urls])
        if fewest >= size or time.monotonic() - started > timeout:
            return fewest, time.monotonic() - started
        await asyncio.sleep(0.05)


# -- one fleet size -----------------------------------------------------------------------


async def measure(size: int, releases: int, replicas: int, store: str, idle: float) -> SizeResult:
    """Everything for one fleet size, from scratch; the numbers as a dict."""
    with tempfile.TemporaryDirectory(prefix="starmesh-fleet-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            repo = policy_repo(work, POLICY.format(v1=100, v2=0))
            plane = start_plane(children, work, repo, replicas, store)
            await asyncio.sleep(1.0)  # let the replicas settle before the "before" RSS
            rss_before = [rss_mb(pid) for pid in plane.pids]
            config = FleetConfig(size=size, control_planes=tuple(plane.urls),
                                 trusted=(load_public_key(work / "keys" / "signing.pub"),), seed=size)  # fmt: skip
            async with Fleet(config) as fleet:
                started = time.monotonic()
                await fleet.wait_registered(START_TIMEOUT)
                await fleet.wait_converged(1, CONVERGE_TIMEOUT)
                connect_seconds = time.monotonic() - started
                print(f"  {size} proxies registered and on release 1 in {connect_seconds:.1f} s", flush=True)
                cpu0, wall0 = [cpu_seconds(pid) for pid in plane.pids], time.monotonic()
                await asyncio.sleep(idle)
                idle_share = [(cpu_seconds(pid) - c) / (time.monotonic() - wall0) for pid, c in zip(plane.pids, cpu0)]
                rows: list[Release] = []
                for i in range(releases):
                    v2 = 10 * (i % 9 + 1)
                    (repo / "mesh.star").write_text(POLICY.format(v1=100 - v2, v2=v2))
                    await asyncio.to_thread(git, repo, "add", "-A")
                    cpu_before = [cpu_seconds(pid) for pid in plane.pids]
                    fleet_before = sum(os.times()[:2])
                    commit_at = time.monotonic()
                    await asyncio.to_thread(git, repo, "commit", "-q", "-m", f"weights {100 - v2}/{v2}")
                    last_ack = await fleet.wait_converged(i + 2, CONVERGE_TIMEOUT)
                    cpu = [cpu_seconds(pid) - c for pid, c in zip(plane.pids, cpu_before)]
                    rows.append(Release(last_ack - commit_at, cpu, sum(os.times()[:2]) - fleet_before))
                    print(f"  release {i + 2}: all {size} ACKed {rows[-1].seconds:.2f} s after the commit; "
                          f"control-plane CPU {sum(cpu):.2f} s", flush=True)  # fmt: skip
                    await asyncio.sleep(1.0)
                rss_after = [rss_mb(pid) for pid in plane.pids]
                synced, status_lag = await _status_synced(plane.urls, size)
                leader = await asyncio.to_thread(_leader, plane.urls[0])
                totals = fleet.totals()
            etcd = None if plane.etcd_pid is None else {"cpu_s": cpu_seconds(plane.etcd_pid), "rss_mb": rss_mb(plane.etcd_pid)}
            return SizeResult(
                proxies=size, replicas=len(plane.pids), store=store, connect_seconds=connect_seconds,
                releases=rows, idle_cpu_share=idle_share, rss_before_mb=rss_before, rss_after_mb=rss_after,
                kb_per_proxy=(sum(rss_after) - sum(rss_before)) * 1024 / size,
                fetches=totals.fetches, fetches_per_proxy_release=totals.fetches / (size * (releases + 1)),
                nacks=totals.nacks, failovers=totals.failovers, status_synced=synced, status_lag=status_lag, leader=leader, etcd=etcd,
            )  # fmt: skip
        finally:
            children.stop_all()


def _row(result: SizeResult) -> str:
    seconds = [r.seconds for r in result.releases]
    per_replica = [statistics.median(r.cpu[i] for r in result.releases) for i in range(result.replicas)]
    fleet_cpu = statistics.median(r.fleet_cpu for r in result.releases)
    rss = " / ".join(f"{b:.0f}→{a:.0f}" for b, a in zip(result.rss_before_mb, result.rss_after_mb))
    return (
        f"| {result.proxies:,} | {result.replicas} ({result.store}) | {statistics.median(seconds):.2f} "
        f"({min(seconds):.2f}–{max(seconds):.2f}) | {sum(per_replica):.2f} ({' + '.join(f'{c:.2f}' for c in per_replica)}) "
        f"| {100 * sum(result.idle_cpu_share):.1f}% | {rss} | {result.kb_per_proxy:.1f} "
        f"| {result.fetches_per_proxy_release:.3f} | {fleet_cpu:.2f} |"
    )


HEADER = (
    "| proxies | replicas | commit→all ACK, s: median (range) | CP CPU s per release: total (per replica) "
    "| CP idle CPU | RSS MB per replica: before→with fleet | KB per proxy | fetches / (proxy·release) | fleet CPU s per release |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def run(sizes: list[int], releases: int, replicas: int, store: str, idle: float) -> list[SizeResult]:
    results = []
    for size in sizes:
        print(f"{size} simulated proxies, {replicas} replica(s), {store} store", flush=True)
        results.append(uvloop.run(measure(size, releases, replicas, store, idle)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, nargs="+", default=[100, 500, 1000], help="fleet sizes (default 100 500 1000)")
    parser.add_argument("--releases", type=int, default=3, help="measured releases per size (default 3)")
    parser.add_argument("--replicas", type=int, help="control-plane replicas (default 3 with HA support, else 1)")
    parser.add_argument("--store", choices=["file", "etcd"], help="default: etcd with more than one replica, else file")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured per size (default 3)")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if min(args.proxies) < 1 or args.releases < 1 or args.idle <= 0:
        parser.error("--proxies and --releases must be at least 1, --idle above 0")
    replicas = args.replicas if args.replicas is not None else (3 if ha_supported() else 1)
    store = args.store or ("etcd" if replicas > 1 else "file")
    if replicas < 1 or (replicas > 1 and store != "etcd"):
        parser.error("--replicas must be at least 1, and more than one needs --store etcd")
    if store == "etcd" and not Path("/usr/bin/etcd").exists():
        parser.error("--store etcd needs /usr/bin/etcd (apt install etcd-server)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the children
    logging.basicConfig(level=logging.ERROR)
    print(f"machine: {machine()}", flush=True)
    try:
        results = run(args.proxies, args.releases, replicas, store, args.idle)
    except (BenchError, FleetError) as exc:
        print(f"fleet bench failed: {exc}", file=sys.stderr)
        return 1
    print("\n" + HEADER)
    for result in results:
        print(_row(result))
    print()
    for result in results:
        extra = "" if result.etcd is None else (f"; leader {result.leader}; etcd: {result.etcd['cpu_s']:.1f} CPU s "
                                                f"in all, {result.etcd['rss_mb']:.0f} MB RSS")
        print(f"{result.proxies:,} proxies: registered and on release 1 in {result.connect_seconds:.1f} s, "
              f"{result.nacks} NACKs, {result.failovers} failovers, {result.status_synced} synced in every "
              f"replica's /v1/status (waited {result.status_lag:.2f} s){extra}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
