"""bench/: the proxy benchmark's harness and its baseline proxy.

The harness's smoke run uses tiny durations and checks only that it produces numbers
and stops everything it started; no timing is asserted anywhere.
"""

from __future__ import annotations

import http.client
import http.server
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:40000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   510.01us  200.12us   5.01ms   90.00%
    Req/Sec    62.10k     1.20k   64.00k    80.00%
  Latency Distribution
     50%  462.00us
     75%  520.00us
     90%  610.00us
     99%    1.11ms
  63024 requests in 1.00s, 9.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  63024.10
Transfer/sec:      9.50MB
"""


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_parse_wrk_reads_throughput_percentiles_and_errors() -> None:
    result = _load("proxy").parse_wrk(WRK_OUTPUT)
    assert result.requests == 63024
    assert result.seconds == pytest.approx(1.0)
    assert result.rps == pytest.approx(63024.10)
    assert result.p50_us == pytest.approx(462.0)
    assert result.p99_us == pytest.approx(1110.0)
    assert result.errors == 3
    assert result.non_2xx == 7


def test_parse_wrk_rejects_output_without_a_latency_distribution() -> None:
    with pytest.raises(ValueError, match="could not read wrk output"):
        _load("proxy").parse_wrk(WRK_OUTPUT.replace("     50%  462.00us\n", ""))


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        reply = b"%s %s x-test=%s " % (self.command.encode(), self.path.encode(), self.headers.get("x-test", "").encode())
        self.send_response(201)
        self.send_header("content-length", str(len(reply) + len(body)))
        self.end_headers()
        self.wfile.write(reply + body)

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo_upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def baseline_proxy(echo_upstream: int) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "baseline_proxy.py"), "--upstream", f"127.0.0.1:{echo_upstream}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.fullmatch(r"listening 127\.0\.0\.1:(\d+)\n", line)
        assert found, f"baseline proxy printed {line!r}"
        yield int(found[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_baseline_proxy_forwards_requests_and_bodies_on_one_connection(baseline_proxy: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", baseline_proxy, timeout=10)
    try:
        conn.request("POST", "/a?b=1", body=b"payload", headers={"x-test": "one"})
        first = conn.getresponse()
        assert (first.status, first.read()) == (201, b"POST /a?b=1 x-test=one payload")
        # Chunked request body, same connection: re-framed with Content-Length upstream.
        conn.request("POST", "/c", body=iter([b"chu", b"nked"]), headers={"x-test": "two"})
        second = conn.getresponse()
        assert (second.status, second.read()) == (201, b"POST /c x-test=two chunked")
        conn.request("GET", "/d")
        third = conn.getresponse()
        assert (third.status, third.read()) == (201, b"GET /d x-test= ")
    finally:
        conn.close()


def test_baseline_proxy_answers_502_when_the_upstream_refuses() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "baseline_proxy.py"), "--upstream", f"127.0.0.1:{closed_port}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 502
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("wrk") and (shutil.which("nginx") or Path("/usr/sbin/nginx").exists())), reason="needs nginx and wrk")
def test_proxy_bench_smoke_run_produces_numbers_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "proxy.py"), "--seconds", "1", "--reps", "1", "--warmup", "0",
         "--concurrency", "1", "2", "--no-two-hop", "--telemetry", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    raw = json.loads(out.read_text())
    for name in ("direct", "nginx", "baseline"):
        row = raw["summary"][name]
        assert row["rps_c2"] > 0 and row["p50_us_c1"] > 0 and row["rss_mb"] > 0, (name, row)
        assert row["errors_c1"] == 0 and row["errors_c2"] == 0, (name, row)
    assert raw["summary"]["nginx"]["rps_c2_vs_nginx"] == 1.0
    assert "| nginx |" in run.stdout
    assert "starmesh" in raw["summary"]  # measured, or reported as unavailable
    started = [pid for pids in raw["pids"].values() for pid in pids]
    assert len(started) >= 5  # two nginx masters and their workers, the baseline proxy
    if "unavailable" not in raw["summary"]["starmesh"]:
        # --telemetry: the same proxy with telemetry off and fully traced, side by side.
        off, default, traced = (raw["summary"][name] for name in ("starmesh-telemetry-off", "starmesh", "starmesh-traced"))
        for row in (off, default, traced):
            assert "unavailable" not in row and row["rps_c2"] > 0 and row["idle_rss_mb"] > 0, row
            assert row["requests_total"] > 0, row  # read from the proxy's /metrics after the runs
        assert off["access_log_dropped_total"] is None  # --access-log off: no log, no drop counter
        assert traced["access_log_dropped_total"] == 0  # capped at 1,000,000 lines/s: every request logged
        assert traced["sink"]["traces"] > 0 and traced["sink"]["bytes"] > 0, traced["sink"]  # spans exported
        started.append(traced["sink"]["pid"])
        assert re.search(r"^\| starmesh-traced \| [0-9,]+ \| [0-9.]+x \|", run.stdout, re.M), run.stdout
    assert not [pid for pid in started if _alive(pid)], "the bench left processes running"


@pytest.mark.slow
def test_apply_and_parts_benches_run(tmp_path: Path) -> None:
    """bench/apply.py and bench/proxy_parts.py run end to end on tiny inputs (no timing asserted)."""
    apply_out = subprocess.run(
        [sys.executable, str(BENCH / "apply.py"), "--services", "10", "--runs", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    row = [line for line in apply_out.splitlines() if line.startswith("| 10 |")]
    assert row, apply_out
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert len(cells) == 8 and all(float(c) >= 0 for c in cells[1:])
    parts_out = subprocess.run(
        [sys.executable, str(BENCH / "proxy_parts.py"), "--n", "200"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    for piece in ("reader", "upstream", "route+chain", "response head"):
        assert re.search(rf"^{re.escape(piece)}\s+[0-9.]+ µs$", parts_out, re.M), parts_out


@pytest.mark.slow
def test_telemetry_pieces_bench_times_each_piece() -> None:
    """bench/proxy_telemetry.py --pieces: traceparent, span, OTLP encoding, access-log line (no timing asserted)."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "proxy_telemetry.py"), "--pieces", "--n", "200"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    for piece in ("traceparent, unsampled", "span start, attributes, end", "OTLP protobuf encoding", "access-log line"):
        found = re.search(rf"^{re.escape(piece)}.*?\s([0-9.]+) µs", out, re.M)
        assert found and float(found[1]) > 0, out
    encoded = re.search(r"OTLP protobuf encoding.*\((\d+) bytes\)", out)
    assert encoded and int(encoded[1]) > 100, out  # a real span, attributes and all, not an empty message


@pytest.mark.slow
def test_propagation_bench_smoke_run_measures_commits_and_stops_everything(
    tmp_path: Path, running_with: Callable[[str], list[str]]
) -> None:
    out_json = tmp_path / "propagation.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "propagation.py"), "--proxies", "2", "--commits", "2", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all 2 proxies applied" in run.stdout
    numbers = json.loads(out_json.read_text())
    assert numbers["proxies"] == 2 and len(numbers["seconds"]) == 2
    assert all(seconds > 0 for seconds in numbers["seconds"])
    # Every control plane and proxy it started is gone (they all ran from its temp dir).
    assert not running_with("starmesh-propagation-")
