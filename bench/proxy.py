"""Proxy benchmark: starmesh's proxy side by side with nginx, on loopback, under wrk.

    .venv/bin/python bench/proxy.py                    # 5 s runs, 3 interleaved repetitions
    .venv/bin/python bench/proxy.py --quick            # 1 s runs
    .venv/bin/python bench/proxy.py --reps 5 --json out.json
    .venv/bin/python bench/proxy.py --profile stacks.txt   # then py-spy on starmesh's proxy
    .venv/bin/python bench/proxy.py --mtls             # and two-hop plaintext vs mTLS (control-plane form)
    .venv/bin/python bench/proxy.py --telemetry        # and one hop with telemetry off / default / traced

Targets, all in front of the same upstream app (nginx answering 200 with a small body,
its own process and config on a loopback port):

  direct      wrk straight to the upstream app (the floor every other target adds to)
  nginx       nginx as a reverse proxy, one worker, upstream keep-alive (the anchor)
  baseline    bench/baseline_proxy.py: a plain forwarding proxy, no policy (asyncio
              Protocols + httptools on uvloop, keep-alive pool to the upstream)
  starmesh    `starmesh proxy --bundle FILE --endpoints FILE` as a real process; wrk
              sends `Host: app` to its outbound listener; the bundle gives `app` the full
              chain (header match rule + 90/10 weighted split, timeout, retries with a
              per-try timeout, circuit breaker, outlier detection, access log, metrics)
              and the endpoints file points both versions at the upstream app: one hop,
              the headline against nginx's one hop
  starmesh-2hop  outbound of one starmesh proxy -> inbound of a second (authorization,
              rate limit) -> app: the whole mesh path, reported separately

With `--mtls` (issue 5: the cost of mTLS), two more two-hop targets, each with both
proxies in the control-plane form against a control plane of its own (a Git repo in the
temp dir, POLICY with `app` split 100/0 since one peer, `app` v1, serves it):

  starmesh-2hop-cp    plain HTTP control plane, the policy's mtls = "disable": plaintext links
  starmesh-2hop-mtls  control plane with --ca/--join-token (`starmesh ca init`), the policy's
              mtls = "strict", both proxies with --ca-cert/--join-token: front -> peer is mTLS

With `--telemetry` (issue 7: the cost of traces and access logs), two more one-hop
targets beside `starmesh`, the same bundle but for its telemetry settings:
`starmesh-telemetry-off` (no access log, no sampling) and `starmesh-traced` (every
request a span exported to a local OTLP sink, every request an access-log line); see
bench/proxy_telemetry.py.

The mTLS target also counts handshakes: the peer inbound's accepted mTLS connections
(`starmesh_inbound_connections_total{transport="mtls"}` on its /metrics) per run.

Load from wrk (`-t1 --latency`) at concurrency 1 and 32; every repetition runs every
target in turn (interleaved, so drift on a noisy machine hits all of them alike) after
one warm-up run each. wrk is pinned to the last CPU and the app and proxies to the
others (taskset): unpinned, on two cores, the scheduler's placement flips a run's p50
at concurrency 1 between two modes (~16 µs and ~55 µs direct), which no median of three
runs survives; `--no-pin` turns pinning off. Reported per target: medians over the
repetitions of requests/s, p50 and p99 latency, CPU per request of the target's
processes (utime and stime from /proc/PID/stat over the run, divided by requests), and
the target's RSS (VmRSS summed over its processes) after the runs. Ratios against nginx: requests/s at c32 (DESIGN.md budget:
>= 0.5x) and added p50 at c1, i.e. the target's p50 minus direct's (budget: <= 2x
nginx's). Prints the machine, the versions, and a Markdown table for BENCHMARKS.md.

Every process started here is stopped at the end, on errors and on Ctrl-C too. If
`starmesh proxy` cannot start or does not forward correctly, its targets are reported as
unavailable (with the reason) and the others are still measured.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _nginx  # noqa: E402  (bench/ is a folder of scripts, not a package)
import proxy_telemetry as telemetry_bench  # noqa: E402
from _machine import machine  # noqa: E402

__all__ = ["Target", "WrkResult", "main", "parse_wrk", "run_bench"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SERVICE = "app"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0

# wrk on the last CPU, everything it loads on the others (taskset prefixes; `--no-pin`: none).
PLACEMENT: dict[str, list[str]] = {"servers": [], "load": []}

POLICY = """\
mesh(name = "bench", mtls = "disable")

service(name = "client", versions = ["v1"])

service(
    name = "app",
    versions = ["v1", "v2"],
    timeout = "5s",
    retries = retries(attempts = 2, per_try_timeout = "2s", on = ["5xx", "connect-failure", "reset"]),
    circuit_breaker = circuit_breaker(max_connections = 1024, max_pending_requests = 1024, max_requests = 1024),
    outlier_detection = outlier_detection(consecutive_5xx = 5, interval = "10s", base_ejection_time = "30s"),
    rate_limit = rate_limit(1000000),
)

http_route("app", rules = [
    rule(match = [match(path_prefix = "/", headers = {"x-canary": "true"})], backends = {"v2": 100}),
    rule(backends = {"v1": 90, "v2": 10}),
])

authorization("app", rules = [allow(methods = ["GET"], paths = ["/*"])])

request_test("canary header goes to v2", service = "app", headers = {"x-canary": "true"}, backends = "v2")
request_test("default split", service = "app", backends = {"v1": 90, "v2": 10})
"""


class BenchError(Exception):
    """A target could not be started or does not answer correctly."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles (µs) and socket errors."""

    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    non_2xx: int


@dataclass
class Target:
    """Something wrk can load: a URL, and the processes whose CPU and memory it costs."""

    name: str
    url: str = ""
    pids: list[int] = field(default_factory=list)
    unavailable: str | None = None
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    rss_mb: float | None = None
    tls_metrics: str = ""
    """An admin /metrics URL whose inbound mTLS connection counter this target's runs read."""
    handshakes_total: int | None = None
    """That counter after the runs: every mTLS connection since start (checks and warm-up too)."""
    idle_rss_mb: float | None = None
    """RSS after start and one check request, before the warm-up."""
    report: Callable[[], dict[str, object]] | None = None
    """Read after the runs (e.g. the target's own counters); its numbers join the summary row."""
    extra: dict[str, object] = field(default_factory=dict)


# --- processes ---------------------------------------------------------------------


class Processes:
    """Children of the bench, each in its own process group; all stopped by stop_all()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[subprocess.Popen[bytes]] = []
        self.worktrees: list[Path] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*PLACEMENT["servers"], *argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.workdir, env=None if env is None else {**os.environ, **env},
            )
        self.children.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in reversed(self.children):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: nginx's worker too
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=5)
        self.children.clear()
        for tree in self.worktrees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False, timeout=60)
        self.worktrees.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"exited with {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise BenchError(f"not listening on 127.0.0.1:{port} after {START_TIMEOUT:.0f} s: {_tail(log)}")


def wait_for_line(pattern: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = START_TIMEOUT) -> re.Match[str]:
    """Poll the child's log for a line matching pattern (e.g. its bound address)."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = regex.search(log.read_text(errors="replace"))
        if found:
            return found
        if proc.poll() is not None:
            raise BenchError(f"exited with {proc.returncode}: {_tail(log)}")
        time.sleep(0.02)
    raise BenchError(f"printed no line matching {pattern!r} in {timeout:.0f} s: {_tail(log)}")


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no output)"


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree.extend(children)
        frontier = children
    return tree


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by the processes."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime (field 14)
        system += int(fields[12])  # stime (field 15)
    return user / CLK_TCK, system / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# --- targets -----------------------------------------------------------------------


def start_nginx(procs: Processes, name: str, config: str, port: int) -> list[int]:
    prefix = procs.workdir / name
    proc, log = procs.start(name, _nginx.command(prefix, config))
    wait_listening(port, proc, prefix / "error.log")
    return process_tree(proc.pid)


def start_baseline(procs: Processes, upstream_port: int) -> tuple[str, list[int]]:
    argv = [sys.executable, str(BENCH / "baseline_proxy.py"), "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}"]
    proc, log = procs.start("baseline", argv)
    found = wait_for_line(r"^listening (\S+):(\d+)$", proc, log)
    return f"http://{found[1]}:{found[2]}/", [proc.pid]


def _starmesh_command() -> list[str]:
    exe = Path(sys.executable).with_name("starmesh")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "starmesh.cli"]


def compile_bundle(workdir: Path, source: str = POLICY, name: str = "bundle") -> Path:
    policy = workdir / f"{name}-policy"
    policy.mkdir(exist_ok=True)
    (policy / "mesh.star").write_text(source)
    bundle = workdir / f"{name}.json"
    out = subprocess.run([*_starmesh_command(), "compile", str(policy), "-o", str(bundle)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"starmesh compile failed: {(out.stdout + out.stderr).strip()}")
    return bundle


def source_tree(procs: Processes, ref: str) -> Path:
    """Check `ref` out of this repository and lay it out as an importable `starmesh` package.

    The top-level folders map to `starmesh.<folder>` (pyproject's package-dir); a folder
    of symlinks reproduces that, and PYTHONPATH puts it ahead of the installed tree."""
    checkout = procs.workdir / "against-checkout"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(checkout), ref], check=True, timeout=60)
    procs.worktrees.append(checkout)
    root = procs.workdir / "against"
    (root / "starmesh").mkdir(parents=True)
    for folder in ("bundle", "compiler", "runtime", "reconciler", "preview", "policies", "cli"):
        if (checkout / folder).is_dir():
            (root / "starmesh" / folder).symlink_to(checkout / folder)
    return root


def start_starmesh(
    procs: Processes, name: str, service: str, app: str, bundle: Path, endpoints: dict[str, dict[str, list[str]]],
    tree: Path | None = None, extra: list[str] | None = None,
) -> dict[str, str]:
    """Start one `starmesh proxy --bundle` (from `tree`, see source_tree; `extra` flags); its listener addresses."""
    state = procs.workdir / name
    state.mkdir(exist_ok=True)
    endpoints_file = state / "endpoints.json"
    endpoints_file.write_text(json.dumps(endpoints))
    command = [sys.executable, "-m", "starmesh.cli"] if tree is not None else _starmesh_command()
    argv = [*command, *_proxy_args(service, app, state), "--bundle", str(bundle), "--endpoints", str(endpoints_file)]
    argv += extra or []
    proc, log = procs.start(name, argv, env=None if tree is None else {"PYTHONPATH": str(tree)})
    addresses = _listeners(proc, log)
    state_line = wait_for_line(r"^(ready sha256:\S+|not ready: .*)$", proc, log)[1]
    if not state_line.startswith("ready"):
        raise BenchError(f"{name}: {state_line}")
    return addresses


def _proxy_args(service: str, app: str, state: Path) -> list[str]:
    return [
        "proxy", "--service", service, "--version", "v1", "--app", app,
        "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(state),
    ]  # fmt: skip


def _listeners(proc: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    addresses = {"pid": str(proc.pid)}
    for listener in ("outbound", "inbound", "admin"):
        addresses[listener] = wait_for_line(rf"^{listener} (127\.0\.0\.1:\d+)\s*$", proc, log)[1]
    return addresses


# --- control-plane form (--mtls) ---------------------------------------------------------

CP_TIMEOUT = 90.0
"""Compile, release, certificates, registration and the endpoint long-poll, on a busy machine."""


def mesh_policy(mtls: str) -> str:
    """POLICY with the mesh's `mtls` mode and `app`'s default split 100/0: one peer (v1) registers."""
    return POLICY.replace('mtls = "disable"', f'mtls = "{mtls}"').replace('{"v1": 90, "v2": 10}', '{"v1": 100, "v2": 0}')


def _run(argv: list[str], what: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"{what} failed ({out.returncode}): {(out.stdout + out.stderr).strip()}")


def start_control_plane(procs: Processes, name: str, mtls: str, keys: Path) -> tuple[list[str], dict[str, str]]:
    """A Git repo with mesh_policy(mtls) and a control plane on it (with a CA and join token unless
    mtls is "disable"); the arguments and environment its proxies need."""
    base = procs.workdir / name
    repo = base / "repo"
    repo.mkdir(parents=True)
    (repo / "mesh.star").write_text(mesh_policy(mtls))
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", f"bench policy, mtls {mtls}"]):
        _run([*git, *args], f"git {args[0]} in {repo}")
    argv = [
        *_starmesh_command(), "control-plane", "--repo", str(repo), "--branch", "main",
        "--key", str(keys / "signing.key"), "--state-dir", str(base / "state"), "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    proxy_args, env, scheme = ["--trust", str(keys / "signing.pub")], {}, "http"
    if mtls != "disable":
        ca = base / "ca"
        _run([*_starmesh_command(), "ca", "init", "--trust-domain", "cluster.local", "--out", str(ca)], "starmesh ca init")
        token = secrets.token_urlsafe(32)
        argv += ["--ca", str(ca), "--join-token", token]
        proxy_args += ["--ca-cert", str(ca / "ca.crt")]
        env, scheme = {"STARMESH_JOIN_TOKEN": token}, "https"
    proc, log = procs.start(name, argv)
    address = wait_for_line(r"^listening (\S+)\s*$", proc, log, CP_TIMEOUT)[1]
    wait_for_line(r"^ready release ", proc, log, CP_TIMEOUT)
    return ["--control-plane", f"{scheme}://{address}", *proxy_args], env


def start_cp_proxy(procs: Processes, name: str, service: str, app: str, control_plane: tuple[list[str], dict[str, str]]) -> dict[str, str]:
    """One control-plane-form proxy, waited for until its /readyz answers 200; its listener addresses."""
    state = procs.workdir / name
    args, env = control_plane
    proc, log = procs.start(name, [*_starmesh_command(), *_proxy_args(service, app, state), *args], env=env or None)
    addresses = _listeners(proc, log)
    deadline = time.monotonic() + CP_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{addresses['admin']}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return addresses
        except OSError:
            pass  # 503 not ready (HTTPError is an OSError) or not answering yet
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name} not ready after {CP_TIMEOUT:.0f} s: {_tail(log)}")
        time.sleep(0.1)


def start_two_hop_cp(procs: Processes, target: Target, mtls: str, app: str, keys: Path) -> None:
    """front (client) -> peer (app v1, registered as app's endpoint) -> app, in the control-plane form."""
    control_plane = start_control_plane(procs, f"cp-{mtls}", mtls, keys)
    peer = start_cp_proxy(procs, f"{target.name}-peer", SERVICE, app, control_plane)
    front = start_cp_proxy(procs, f"{target.name}-front", "client", app, control_plane)
    target.url = f"http://{front['outbound']}/"
    target.pids = [int(front["pid"]), int(peer["pid"])]
    if mtls != "disable":
        target.tls_metrics = f"http://{peer['admin']}/metrics"
    deadline = time.monotonic() + CP_TIMEOUT
    while True:  # the front learns the peer's inbound from the control plane's endpoint table
        try:
            check(target.url)
            return
        except BenchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def check(url: str) -> None:
    """One GET through the target: it must answer the upstream's 200 and body."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": SERVICE})
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            error = response.getheader("x-starmesh-error")
        except OSError as exc:
            raise BenchError(f"GET {url}: {exc}") from exc
        finally:
            conn.close()
        if response.status == 200 and body == _nginx.UPSTREAM_BODY:
            return
        if error != "not-ready" or time.monotonic() > deadline:
            raise BenchError(f"GET {url} answered {response.status} {error or ''} {body[:120]!r}, not the upstream's 200")
        time.sleep(0.05)


def start_telemetry(procs: Processes, targets: list[Target], starmesh: Target, admin: str, app: str) -> None:
    """--telemetry: an OTLP sink, then proxy_telemetry.VARIANTS' proxies on either side of `starmesh`."""
    variants = {v.name: Target(v.name) for v in telemetry_bench.VARIANTS}
    at = targets.index(starmesh)
    targets[at : at + 1] = [variants[telemetry_bench.OFF], starmesh, variants[telemetry_bench.TRACED]]
    starmesh.report = telemetry_bench.counters(admin)
    sink, why = "", ""
    try:
        proc, log = procs.start("otlp-sink", telemetry_bench.sink_command())
        sink = wait_for_line(r"^listening (\S+)$", proc, log)[1]
    except (BenchError, OSError) as exc:
        why = f"OTLP sink: {exc}"
    for variant in telemetry_bench.VARIANTS:
        target = variants[variant.name]
        try:
            if variant.otlp and not sink:
                raise BenchError(why)
            bundle = compile_bundle(procs.workdir, telemetry_bench.policy(POLICY, variant), variant.name)
            args = telemetry_bench.proxy_args(variant, procs.workdir / variant.name, sink)
            endpoints = {SERVICE: {"v1": [app], "v2": [app]}}
            found = start_starmesh(procs, variant.name, "client", app, bundle, endpoints, extra=args)
            target.url, target.pids = f"http://{found['outbound']}/", [int(found["pid"])]
            target.report = telemetry_bench.counters(found["admin"], sink if variant.otlp else None)
        except (BenchError, OSError, ValueError, subprocess.SubprocessError) as exc:
            target.unavailable = str(exc)


# --- wrk ---------------------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _micros(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not found:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(found[1]) * _UNITS[found[2]]


def parse_wrk(output: str) -> WrkResult:
    """Read requests, duration, requests/s, p50, p99 and errors from `wrk --latency` output."""
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (done and rps and p50 and p99):
        raise ValueError(f"could not read wrk output:\n{output}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(done[1]),
        seconds=_micros(done[2] + done[3]) / 1e6,
        rps=float(rps[1]),
        p50_us=_micros(p50[1]),
        p99_us=_micros(p99[1]),
        errors=sum(int(g) for g in socket_errors.groups()) if socket_errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def run_wrk(url: str, connections: int, seconds: int) -> WrkResult:
    """wrk takes whole seconds only."""
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    argv = [*PLACEMENT["load"], wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {SERVICE}", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise BenchError(f"wrk {' '.join(argv[1:])} failed ({out.returncode}): {(out.stdout + out.stderr).strip()}")
    return parse_wrk(out.stdout)


def mtls_connections(metrics_url: str) -> int:
    """The inbound's accepted mTLS connections (one handshake each) from its admin /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read(1 << 20).decode()
    found = re.search(r'^starmesh_inbound_connections_total\{transport="mtls"\} (\d+)$', text, re.MULTILINE)
    if not found:
        raise BenchError(f"{metrics_url} has no starmesh_inbound_connections_total{{transport=\"mtls\"}}")
    return int(found[1])


def measure(target: Target, connections: int, seconds: int) -> dict[str, float]:
    handshakes_before = mtls_connections(target.tls_metrics) if target.tls_metrics else 0
    user_before, system_before = cpu_seconds(target.pids)
    result = run_wrk(target.url, connections, seconds)
    user_after, system_after = cpu_seconds(target.pids)
    handshakes = mtls_connections(target.tls_metrics) - handshakes_before if target.tls_metrics else 0
    per_request = 1e6 / result.requests if result.requests else float("nan")
    return {
        "handshakes": handshakes,
        "rps": result.rps,
        "p50_us": result.p50_us,
        "p99_us": result.p99_us,
        "requests": result.requests,
        "cpu_us_per_request": (user_after - user_before + system_after - system_before) * per_request,
        "cpu_user_us_per_request": (user_after - user_before) * per_request,
        "cpu_system_us_per_request": (system_after - system_before) * per_request,
        "errors": result.errors,
        "non_2xx": result.non_2xx,
    }


# --- profile -----------------------------------------------------------------------


def top_functions(collapsed: str, limit: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:limit]
        return [(name, 100.0 * n / total) for name, n in best]

    return (ranked(own), ranked(inclusive)) if total else ([], [])


def profile(target: Target, connections: int, seconds: int, out: Path) -> str:
    """Sample the target's first process with py-spy during one wrk run; a text report."""
    spy_binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy_binary).exists():
        return "py-spy not installed (`.venv/bin/pip install py-spy`): no profile"
    argv = [spy_binary, "record", "-p", str(target.pids[0]), "-d", str(seconds + 1), "-r", "1000",
            "--format", "raw", "--nonblocking", "-o", str(out)]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # py-spy attaches
        result = run_wrk(target.url, connections, seconds)
        _, err = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not out.exists():
        return f"py-spy failed ({spy.returncode}): {err.decode(errors='replace').strip()[-400:]}"
    own, inclusive = top_functions(out.read_text())
    lines = [f"py-spy on {target.name} (pid {target.pids[0]}), c{connections}, {result.rps:,.0f} req/s while sampled; "
             f"share of non-idle samples:", "", "self:"]  # fmt: skip
    lines += [f"  {share:5.1f}%  {name}" for name, share in own]
    lines += ["", "inclusive:"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in inclusive]
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------


def start_targets(
    procs: Processes, two_hop: bool, against: str | None = None, mtls: bool = False, telemetry: bool = False
) -> list[Target]:
    app_port = free_port()
    app_pids = start_nginx(procs, "upstream", _nginx.app_config(procs.workdir / "upstream", app_port), app_port)
    direct = Target("direct", f"http://127.0.0.1:{app_port}/", app_pids)

    proxy_port = free_port()
    nginx_pids = start_nginx(procs, "nginx", _nginx.proxy_config(procs.workdir / "nginx", proxy_port, app_port), proxy_port)
    nginx = Target("nginx", f"http://127.0.0.1:{proxy_port}/", nginx_pids)

    url, pids = start_baseline(procs, app_port)
    baseline = Target("baseline", url, pids)

    targets = [direct, nginx, baseline]
    starmesh = Target("starmesh")
    targets.append(starmesh)
    hop2 = Target("starmesh-2hop") if two_hop else None
    if hop2:
        targets.append(hop2)
    app = f"127.0.0.1:{app_port}"
    if mtls:
        with_cp = [Target("starmesh-2hop-cp"), Target("starmesh-2hop-mtls")]
        targets += with_cp
        try:
            keys = procs.workdir / "keys"
            _run([*_starmesh_command(), "keygen", "--out", str(keys)], "starmesh keygen")
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            for target in with_cp:
                target.unavailable = str(exc)
        else:
            for target, mode in zip(with_cp, ("disable", "strict"), strict=True):
                try:
                    start_two_hop_cp(procs, target, mode, app, keys)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    target.unavailable = str(exc)
    try:
        bundle = compile_bundle(procs.workdir)
        one = start_starmesh(procs, "starmesh", "client", app, bundle, {SERVICE: {"v1": [app], "v2": [app]}})
        starmesh.url, starmesh.pids = f"http://{one['outbound']}/", [int(one["pid"])]
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        starmesh.unavailable = str(exc)
        if hop2:
            hop2.unavailable = "starmesh proxy unavailable"
        return targets
    if telemetry:
        start_telemetry(procs, targets, starmesh, one["admin"], app)
    if against is not None:
        other = Target(f"starmesh@{against}")
        targets.insert(targets.index(starmesh), other)
        try:
            tree = source_tree(procs, against)
            found = start_starmesh(procs, "starmesh-against", "client", app, bundle, {SERVICE: {"v1": [app], "v2": [app]}}, tree)
            other.url, other.pids = f"http://{found['outbound']}/", [int(found["pid"])]
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            other.unavailable = str(exc)
    if hop2:
        try:
            peer = start_starmesh(procs, "starmesh-peer", SERVICE, app, bundle, {})
            inbound = peer["inbound"]
            front = start_starmesh(procs, "starmesh-front", "client", app, bundle, {SERVICE: {"v1": [inbound], "v2": [inbound]}})
            hop2.url = f"http://{front['outbound']}/"
            hop2.pids = [int(front["pid"]), int(peer["pid"])]
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            hop2.unavailable = str(exc)
    return targets


def run_bench(
    seconds: int,
    reps: int,
    concurrencies: list[int],
    two_hop: bool,
    warmup: int,
    profile_to: Path | None = None,
    profile_target: str = "starmesh",
    against: str | None = None,
    mtls: bool = False,
    telemetry: bool = False,
) -> tuple[list[Target], str]:
    """Start everything, run the interleaved repetitions (then the profile), stop everything."""
    with tempfile.TemporaryDirectory(prefix="starmesh-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            targets = start_targets(procs, two_hop, against, mtls, telemetry)
            for target in targets:
                if target.unavailable is None:
                    try:
                        check(target.url)
                    except BenchError as exc:
                        target.unavailable = str(exc)
                if target.unavailable is not None:
                    print(f"{target.name}: unavailable: {target.unavailable}", flush=True)
                    if target.name in ("direct", "nginx"):
                        raise SystemExit(f"the {target.name} target must work: {target.unavailable}")
            live = [t for t in targets if t.unavailable is None]
            for target in live:
                target.pids = sorted({pid for root in target.pids for pid in process_tree(root)})
                target.idle_rss_mb = rss_mb(target.pids)
                if warmup > 0:
                    run_wrk(target.url, max(concurrencies), warmup)
            for rep in range(reps):
                for c in concurrencies:
                    for target in live:
                        row = measure(target, c, seconds)
                        target.runs.setdefault(c, []).append(row)
                        print(
                            f"rep {rep + 1}/{reps} c{c:<3} {target.name:<22} {row['rps']:>9.0f} req/s  "
                            f"p50 {row['p50_us']:>7.0f} µs  p99 {row['p99_us']:>7.0f} µs  "
                            f"cpu {row['cpu_us_per_request']:>5.1f} µs/req"
                            + (f"  handshakes {row['handshakes']:.0f}" if target.tls_metrics else "")
                            + (f"  ERRORS {row['errors']:.0f} non-2xx {row['non_2xx']:.0f}" if row["errors"] or row["non_2xx"] else ""),
                            flush=True,
                        )
            for target in live:
                target.rss_mb = rss_mb(target.pids)
                if target.tls_metrics:
                    target.handshakes_total = mtls_connections(target.tls_metrics)
                if target.report is not None:
                    try:
                        target.extra = target.report()
                    except (OSError, ValueError) as exc:
                        print(f"{target.name}: counters unreadable: {exc}", flush=True)
            if profile_to is not None:
                for target in live:
                    if target.name == profile_target:
                        print(profile(target, max(concurrencies), seconds, profile_to), flush=True)
                        break
                else:
                    print(f"{profile_target} unavailable: no profile", flush=True)
            versions = _versions()
        finally:
            procs.stop_all()
    return targets, versions


# --- report ------------------------------------------------------------------------


def median(target: Target, c: int, key: str) -> float | None:
    rows = target.runs.get(c)
    return statistics.median(r[key] for r in rows) if rows else None


def summarize(targets: list[Target], concurrencies: list[int]) -> dict[str, dict[str, object]]:
    by_name = {t.name: t for t in targets}
    low, high = min(concurrencies), max(concurrencies)
    direct_p50 = median(by_name["direct"], low, "p50_us")
    nginx = by_name["nginx"]
    nginx_rps = median(nginx, high, "rps")
    nginx_added = (median(nginx, low, "p50_us") or 0) - (direct_p50 or 0)
    summary: dict[str, dict[str, object]] = {}
    for t in targets:
        if t.unavailable is not None:
            summary[t.name] = {"unavailable": t.unavailable}
            continue
        row: dict[str, object] = {"rss_mb": round(t.rss_mb or 0, 1), "idle_rss_mb": round(t.idle_rss_mb or 0, 1)}
        row.update(t.extra)
        for c in concurrencies:
            for key in ("rps", "p50_us", "p99_us", "cpu_us_per_request", "cpu_user_us_per_request", "cpu_system_us_per_request"):
                value = median(t, c, key)
                row[f"{key}_c{c}"] = round(value, 1) if value is not None else None
            row[f"errors_c{c}"] = sum(r["errors"] + r["non_2xx"] for r in t.runs.get(c, []))
            if t.tls_metrics:
                row["handshakes_total"] = t.handshakes_total
                row[f"handshakes_c{c}"] = [int(r["handshakes"]) for r in t.runs.get(c, [])]
                row[f"requests_c{c}"] = [int(r["requests"]) for r in t.runs.get(c, [])]
        rps = median(t, high, "rps")
        p50 = median(t, low, "p50_us")
        if t.name != "direct" and p50 is not None and direct_p50 is not None:
            added = p50 - direct_p50
            row[f"added_p50_us_c{low}"] = round(added, 1)
            row["added_p50_vs_nginx"] = round(added / nginx_added, 2) if nginx_added > 0 else None
        if rps is not None and nginx_rps:
            row[f"rps_c{high}_vs_nginx"] = round(rps / nginx_rps, 3)
        summary[t.name] = row
    return summary


def markdown(summary: dict[str, dict[str, object]], concurrencies: list[int]) -> str:
    low, high = min(concurrencies), max(concurrencies)

    def cell(row: dict[str, object], key: str, fmt: str = "{:,.0f}") -> str:
        value = row.get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "–"

    lines = [
        f"| target | req/s c{high} | × nginx | p50 c{low} µs | added p50 c{low} µs | × nginx added | p99 c{low} µs "
        f"| p50 c{high} µs | p99 c{high} µs | CPU µs/req c{high} | RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        if "unavailable" in row:
            lines.append(f"| {name} | unavailable | | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {cell(row, f'rps_c{high}')} | {cell(row, f'rps_c{high}_vs_nginx', '{:.2f}x')} "
            f"| {cell(row, f'p50_us_c{low}')} | {cell(row, f'added_p50_us_c{low}')} | {cell(row, 'added_p50_vs_nginx', '{:.2f}x')} "
            f"| {cell(row, f'p99_us_c{low}')} | {cell(row, f'p50_us_c{high}')} | {cell(row, f'p99_us_c{high}')} "
            f"| {cell(row, f'cpu_us_per_request_c{high}', '{:.1f}')} | {cell(row, 'rss_mb', '{:.1f}')} |"
        )
    return "\n".join(lines)


def budgets(summary: dict[str, dict[str, object]], concurrencies: list[int]) -> list[str]:
    low, high = min(concurrencies), max(concurrencies)
    row = summary.get("starmesh", {})
    if "unavailable" in row or not row:
        return ["starmesh: unavailable, budgets not checked"]
    rps_ratio = row.get(f"rps_c{high}_vs_nginx")
    added_ratio = row.get("added_p50_vs_nginx")
    out = []
    if isinstance(rps_ratio, float):
        out.append(f"requests/s at c{high}: {rps_ratio:.2f}x nginx (budget >= 0.5x): {'met' if rps_ratio >= 0.5 else 'MISSED'}")
    if isinstance(added_ratio, float):
        out.append(f"added p50 at c{low}: {added_ratio:.2f}x nginx's (budget <= 2x): {'met' if added_ratio <= 2 else 'MISSED'}")
    out.append(f"CPU per request at c{high}, user + system µs (one core's ceiling, 1e6 / CPU per request, in req/s):")
    for name in ("nginx", "baseline", "starmesh"):
        r = summary.get(name, {})
        user, system = r.get(f"cpu_user_us_per_request_c{high}"), r.get(f"cpu_system_us_per_request_c{high}")
        if isinstance(user, float) and isinstance(system, float) and user + system > 0:
            out.append(f"  {name:<9} {user:5.1f} + {system:5.1f} = {user + system:5.1f} µs  ({1e6 / (user + system):,.0f} req/s)")
    return out


def mtls_cost(summary: dict[str, dict[str, object]], concurrencies: list[int]) -> list[str]:
    """starmesh-2hop-mtls against starmesh-2hop-cp: the ratios (and differences) issue 5 asks for."""
    low, high = min(concurrencies), max(concurrencies)
    plain, tls = summary.get("starmesh-2hop-cp", {}), summary.get("starmesh-2hop-mtls", {})
    if not plain or not tls or "unavailable" in plain or "unavailable" in tls:
        return ["mTLS cost: not measured (a control-plane-form target is unavailable)"]
    out = ["mTLS cost, starmesh-2hop-mtls / starmesh-2hop-cp (both proxies in the control-plane form):"]
    for label, key, unit in (
        (f"requests/s at c{high}", f"rps_c{high}", ""),
        (f"added p50 at c{low}", f"added_p50_us_c{low}", " µs"),
        (f"p99 at c{low}", f"p99_us_c{low}", " µs"),
        (f"p50 at c{high}", f"p50_us_c{high}", " µs"),
        (f"CPU per request at c{high}", f"cpu_us_per_request_c{high}", " µs"),
        (f"CPU per request at c{low}", f"cpu_us_per_request_c{low}", " µs"),
        ("RSS, both proxies", "rss_mb", " MB"),
    ):
        a, b = plain.get(key), tls.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
            out.append(f"  {label:<28} {a:>10,.1f} -> {b:>10,.1f}{unit:<4} {b / a:5.2f}x  ({b - a:+,.1f}{unit})")
    for c in concurrencies:
        shakes, requests = tls.get(f"handshakes_c{c}"), tls.get(f"requests_c{c}")
        if isinstance(shakes, list) and isinstance(requests, list):
            out.append(f"  mTLS handshakes per run at c{c}: {shakes} for {requests} requests")
    out.append(f"  mTLS handshakes since start (checks, warm-up, runs): {tls.get('handshakes_total')}")
    return out


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False).stdout.split(" [")[0]
    return (
        f"nginx {_nginx.nginx_version()}, {wrk_version}, Python {platform.python_version()}, "
        f"uvloop {v('uvloop')}, httptools {v('httptools')}, starmesh {v('starmesh')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run, whole seconds (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 s runs and a short warm-up")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="wrk connections (default 1 32)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target, 0 for none (default 2)")
    parser.add_argument("--no-two-hop", dest="two_hop", action="store_false", help="skip the two-sidecar path")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false",
        help="let the scheduler place wrk, the app and the proxies (default: wrk on the last CPU, the rest on the others)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE",
        help="after the runs, sample the starmesh proxy with py-spy during one more run at the highest "
        "concurrency; collapsed stacks to FILE, top functions printed",
    )  # fmt: skip
    parser.add_argument("--profile-target", default="starmesh", help=argparse.SUPPRESS)
    parser.add_argument(
        "--against", metavar="REF",
        help="also run starmesh's proxy as of git REF (e.g. HEAD, for uncommitted changes) side by side",
    )  # fmt: skip
    parser.add_argument(
        "--mtls", action="store_true",
        help="also run the two-hop path in the control-plane form, plaintext (starmesh-2hop-cp) and mTLS "
        "(starmesh-2hop-mtls), each against its own control plane, and report the cost of mTLS",
    )  # fmt: skip
    parser.add_argument(
        "--telemetry", action="store_true",
        help="also run one hop with telemetry off (starmesh-telemetry-off) and traced to a local OTLP sink with "
        "every request logged (starmesh-traced), and report their cost against telemetry off",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            parser.error("--pin needs at least 2 CPUs and taskset (util-linux)")
        PLACEMENT["load"] = ["taskset", "-c", str(cpus[-1])]
        PLACEMENT["servers"] = ["taskset", "-c", ",".join(map(str, cpus[:-1]))]
    if args.quick:
        args.seconds, args.warmup = 1, 1
    _nginx.ensure_installed()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the children
    print(f"machine: {machine()}", flush=True)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    targets, versions = run_bench(
        args.seconds, args.reps, args.concurrency, args.two_hop, args.warmup, args.profile, args.profile_target, args.against,
        args.mtls, args.telemetry,
    )
    print(f"versions: {versions}")
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} (the bench itself adds ~2)")
    summary = summarize(targets, args.concurrency)
    print()
    pinned = f", wrk pinned to CPU {PLACEMENT['load'][-1]}, the rest to {PLACEMENT['servers'][-1]}" if args.pin else ""
    print(f"wrk -t1, {args.seconds:g} s runs, medians of {args.reps} interleaved repetitions{pinned}")
    print()
    print(markdown(summary, args.concurrency))
    print()
    for line in budgets(summary, args.concurrency):
        print(line)
    if args.mtls:
        print()
        for line in mtls_cost(summary, args.concurrency):
            print(line)
    if args.telemetry:
        print()
        for line in telemetry_bench.cost_table(summary, args.concurrency):
            print(line)
    for t in targets:
        if t.unavailable is not None:
            print(f"{t.name}: unavailable: {t.unavailable}")
    if args.json:
        raw = {
            "machine": machine(),
            "versions": versions,
            "load_average": {"before": load_before, "after": load_after},
            "settings": {
                "seconds": args.seconds, "reps": args.reps, "concurrency": args.concurrency,
                "warmup": args.warmup, "pin": args.pin, "mtls": args.mtls, "telemetry": args.telemetry,
            },  # fmt: skip
            "summary": summary,
            "runs": {t.name: {str(c): rows for c, rows in t.runs.items()} for t in targets},
            "pids": {t.name: t.pids for t in targets},
        }
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
