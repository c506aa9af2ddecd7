"""End to end: an access-log flood keeps to mesh(access_log(max_lines_per_second)) and to
bounded memory, and what it does not write it counts.

A real `starmesh proxy` answers every request itself (the destination has no endpoint:
503 `no-healthy-upstream`, which passes through the whole outbound chain, telemetry
first), so a pipelining client on a few connections can send tens of thousands of
requests. The cap is 5 lines per second: nearly every line is dropped, and counted.

Memory: the proxy's RSS (/proc/PID/status VmRSS) after a warm-up batch and after the
flood must not differ by more than a generous margin. That is a bound on memory, not on
time: an unbounded queue or a line kept per request would grow it by tens of megabytes.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

RATE = 5
POLICY = f"""
mesh(name = "flood", mtls = "disable", access_log = access_log(enabled = True, max_lines_per_second = {RATE}))
service(name = "client")
service(name = "sink")
"""

WARM_UP = 4_000
FLOOD = 20_000
CONNECTIONS = 4
BATCH = 100
RSS_MARGIN_KB = 8 * 1024
REQUEST = b"GET /flood/item?page=1 HTTP/1.1\r\nHost: sink\r\nUser-Agent: flood\r\nX-Request-Id: r\r\n\r\n"


def _send(address: str, n: int, answers: list[int], failures: list[str]) -> None:
    """`n` pipelined requests on one connection, BATCH at a time; counts the 503 answers."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            left = n
            while left:
                batch = min(BATCH, left)
                sock.sendall(REQUEST * batch)
                seen = 0
                buffer = b""
                while seen < batch:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        raise ConnectionError(f"closed after {n - left + seen} answers")
                    buffer += chunk
                    seen = buffer.count(b"HTTP/1.1 ")
                answers.append(buffer.count(b"HTTP/1.1 503 "))
                left -= batch
    except OSError as exc:
        failures.append(f"{address}: {exc}")


def flood(address: str, n: int) -> int:
    """Send `n` requests over CONNECTIONS connections; the number answered 503."""
    answers: list[int] = []
    failures: list[str] = []
    threads = [
        threading.Thread(target=_send, args=(address, n // CONNECTIONS, answers, failures)) for _ in range(CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)
    return sum(answers)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def dropped_on_metrics(admin: str) -> int | None:
    """`starmesh_access_log_dropped_total` from the admin /metrics (None: not exposed)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^starmesh_access_log_dropped_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.MULTILINE)
    return None if found is None else int(float(found.group(1)))


def test_a_log_flood_is_capped_counted_and_keeps_memory_flat(mesh: Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    proxy = mesh.start_proxy(
        "client", "v1", "127.0.0.1:9", mesh.bundle(POLICY), extra=["--access-log", str(log)], log=tmp_path / "proxy.log"
    )
    proxy.wait_ready()

    started = time.monotonic()
    assert flood(proxy.outbound, WARM_UP) == WARM_UP
    warm_rss = rss_kb(proxy.process.pid)
    warm_dropped = dropped_on_metrics(proxy.admin)

    assert flood(proxy.outbound, FLOOD) == FLOOD
    elapsed = time.monotonic() - started
    flood_rss = rss_kb(proxy.process.pid)
    flood_dropped = dropped_on_metrics(proxy.admin)

    assert proxy.stop() == 0  # the writer has written what was queued
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    total = WARM_UP + FLOOD
    # The cap: a full bucket (one second's worth) at the start, then RATE a second.
    assert 0 < len(lines) <= RATE * (elapsed + 1), (len(lines), elapsed)
    assert all(line["status"] == 503 and line["reason"] == "no-healthy-upstream" for line in lines)
    assert lines[0]["path"] == "/flood/item" and lines[0]["request_id"] == "r"
    # Every request was either written or counted as dropped.
    summary = re.search(r"access log \S+: (\d+) lines written, (\d+) dropped", (tmp_path / "proxy.log").read_text())
    assert summary is not None, "the proxy did not report its access-log totals at stop"
    assert (int(summary.group(1)), int(summary.group(2))) == (len(lines), total - len(lines))
    # ... and /metrics said so while it ran.
    assert warm_dropped is not None and flood_dropped is not None
    assert WARM_UP - RATE * (elapsed + 1) <= warm_dropped < flood_dropped <= total - len(lines)
    assert flood_dropped == total - len(lines)
    # Memory stays flat: the queue is bounded and dropped lines are never built.
    assert flood_rss - warm_rss <= RSS_MARGIN_KB, (warm_rss, flood_rss)
