"""A real proxy's /metrics after known traffic: exact counts, parsed by prometheus_client.

The proxy runs as `web` v1 (tests/runtime/conftest.py's `proxies`) in the --bundle form and
calls test apps (tests/runtime/e2e/app.py: /status/<code>, /delay/<ms>) and a held upstream
(`upstreams`), so that each counter is driven a known number of times: retries, a route
timeout, an injected fault, mirror copies, a circuit-breaker overflow, an outlier ejection,
429s from the local rate limit. Then one scrape, and every number is checked.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"], rate_limit = rate_limit(0.01, burst = 2))
service(name = "api", versions = ["v1", "v2"])
service(name = "held", circuit_breaker = circuit_breaker(
    max_connections = 1, max_requests = 1, max_pending_requests = 1))
service(name = "flaky", outlier_detection = outlier_detection(
    consecutive_5xx = 1, base_ejection_time = "600s", max_ejection_percent = 50))
http_route("api", rules = [
    rule(match = [match(path_prefix = "/status/")], backends = {"v1": 100},
         retries = retries(attempts = 2, on = ["5xx"], per_try_timeout = "5s")),
    rule(match = [match(path_prefix = "/delay/")], backends = {"v1": 100}, timeout = "100ms"),
    rule(match = [match(path_prefix = "/fault")], backends = {"v1": 100},
         fault = fault(abort_status = 503, abort_percent = 100)),
    rule(match = [match(path_prefix = "/mirror")], backends = {"v1": 100}, mirror = mirror("v2")),
    rule(backends = {"v1": 100}),
])
"""

Labels = frozenset[tuple[str, str]]


def parse(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, Labels]:
    return name, frozenset(labels.items())


def requests(
    direction: str, source: str, destination: str, status: int, reason: str = "", version: str = "v1"
) -> tuple[str, Labels]:
    """The starmesh_requests_total series of one outcome (a service without an http_route picks no version: "")."""
    return key("starmesh_requests_total", direction=direction, source_service=source, destination_service=destination,
               destination_version=version, response_code=str(status), reason=reason)  # fmt: skip


def scrape(proxy: Any) -> dict[tuple[str, Labels], float]:
    reply = proxy.http("admin", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(reply.body.decode())


@pytest.fixture
def held(upstreams: Any) -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """An upstream that holds each request until `release` is set: (address, arrived, release)."""
    arrived, release = threading.Event(), threading.Event()
    try:
        yield upstreams.start("held", hold=(arrived, release)), arrived, release
    finally:
        release.set()


def test_metrics_count_exactly_what_the_traffic_did(mesh: Any, proxies: Any, held: Any) -> None:
    v1, v2, good, local = mesh.apps("v1", "v2", "good", "local")
    bad = mesh.app("bad", status=500)
    held_address, arrived, release = held
    endpoints = mesh.endpoints({
        "api": {"v1": [v1.address], "v2": [v2.address]},
        "held": {"v1": [held_address]},
        "flaky": {"v1": [bad.address, good.address]},
    })  # fmt: skip
    proxy = proxies.start(bundle=mesh.bundle(POLICY), endpoints=endpoints, app=local.address)
    assert proxy.status.startswith("ready ")

    def outbound(service: str, path: str = "/") -> tuple[int, str | None]:
        reply = proxy.http("outbound", path, {"Host": service})
        return reply.status, reply.error

    # Retries: each of 3 requests tries 3 times (2 retries) and gets the upstream's 503.
    assert [outbound("api", "/status/503") for _ in range(3)] == [(503, None)] * 3
    assert v1.count("GET /status/503") == 9
    # A route timeout (100 ms) on a 10 s answer, twice; an injected fault (503), twice.
    assert [outbound("api", "/delay/10000") for _ in range(2)] == [(504, "timeout")] * 2
    assert [outbound("api", "/fault") for _ in range(2)] == [(503, "fault")] * 2
    # Mirrors: 3 requests, 3 copies to v2 (fire and forget: counted when launched).
    assert [outbound("api", "/mirror") for _ in range(3)] == [(200, None)] * 3
    assert [outbound("api") for _ in range(2)] == [(200, None)] * 2
    # An outlier ejection: the failing endpoint answers 500 once and is ejected for 600 s.
    assert sorted(outbound("flaky") for _ in range(4)) == [(200, None)] * 3 + [(500, None)]
    assert bad.count("GET /") == 1
    # A breaker overflow: one request holds the only slot, one waits, one more overflows.
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(outbound, "held")
        assert arrived.wait(DEADLINE)
        others = [pool.submit(outbound, "held") for _ in range(2)]
        done, _ = wait(others, DEADLINE, FIRST_COMPLETED)
        assert [f.result() for f in done] == [(503, "overflow")]
        release.set()
        assert sorted(f.result() for f in [first, *others]) == [(200, None), (200, None), (503, "overflow")]
    # The local rate limit (burst 2, refilled at 0.01/s): 2 answered, 2 refused.
    inbound = [proxy.http("inbound", "/").status for _ in range(4)]
    assert inbound == [200, 200, 429, 429]
    # The copies are asynchronous: v2 has seen all of them, eventually.
    _wait(lambda: v2.count("GET /mirror") == 3, "three mirror copies at v2")

    found = scrape(proxy)
    expected = {
        requests("outbound", "web", "api", 503): 3,
        requests("outbound", "web", "api", 504, "timeout"): 2,
        requests("outbound", "web", "api", 503, "fault"): 2,
        requests("outbound", "web", "api", 200): 5,
        requests("outbound", "web", "flaky", 200, version=""): 3,
        requests("outbound", "web", "flaky", 500, version=""): 1,
        requests("outbound", "web", "held", 200, version=""): 2,
        requests("outbound", "web", "held", 503, "overflow", version=""): 1,
        requests("inbound", "", "web", 200): 2,
        requests("inbound", "", "web", 429, "rate-limited"): 2,
    }
    counted = {k: v for k, v in found.items() if k[0] == "starmesh_requests_total"}
    assert counted == expected
    # The histogram counts the same requests, every one within +Inf.
    for (_, labels), n in expected.items():
        assert found["starmesh_request_duration_seconds_count", labels] == n
        assert found["starmesh_request_duration_seconds_bucket", labels | {("le", "+Inf")}] == n
    timeout_labels = requests("outbound", "web", "api", 504, "timeout")[1]
    assert found["starmesh_request_duration_seconds_bucket", timeout_labels | {("le", "0.05")}] == 0
    assert found["starmesh_request_duration_seconds_bucket", timeout_labels | {("le", "0.25")}] == 2

    assert found[key("starmesh_retries_total", destination_service="api")] == 6
    assert found[key("starmesh_timeouts_total", destination_service="api")] == 2
    assert found[key("starmesh_circuit_breaker_overflows_total", destination_service="held")] == 1
    assert found[key("starmesh_circuit_breaker_overflows_total", destination_service="api")] == 0
    assert found[key("starmesh_outlier_ejections_total", destination_service="flaky")] == 1
    assert found[key("starmesh_rate_limited_total", destination_service="web")] == 2
    assert found[key("starmesh_mirror_requests_total", destination_service="api", result="sent")] == 3
    assert found[key("starmesh_mirror_requests_total", destination_service="api", result="dropped")] == 0
    assert found[key("starmesh_mirror_dropped_total", destination_service="api")] == 0
    assert found[key("starmesh_access_log_dropped_total")] == 0  # 23 lines, under the default 100/s

    # The proxy's state: a --bundle file (no release), applied once, at the time /config says.
    config = proxy.config()
    assert found[key("starmesh_config_release_version")] == -1
    assert found[key("starmesh_config_bundle_info", digest=str(config["bundle"]))] == 1
    assert found[key("starmesh_config_apply_total", result="ok", reason="")] == 1
    applied_at = datetime.fromisoformat(str(config["applied_at"])).timestamp()
    assert found[key("starmesh_config_last_apply_timestamp_seconds")] == pytest.approx(applied_at, abs=0.001)
    # No control plane, no certificate: those gauges have no sample.
    names = {name for name, _ in found}
    assert not names & {"starmesh_control_plane_last_contact_seconds", "starmesh_config_releases_behind",
                        "starmesh_certificate_expiry_seconds", "starmesh_inbound_connections_total"}  # fmt: skip
    # Bounded labels: no path of the traffic above appears anywhere.
    assert not any("/" in value for _, labels in found for _, value in labels)


def test_active_connections_follow_connections_opened_and_closed(mesh: Any, proxies: Any) -> None:
    local, v1 = mesh.apps("local", "v1")
    endpoints = mesh.endpoints({"api": {"v1": [v1.address]}})
    proxy = proxies.start(bundle=mesh.bundle(POLICY), endpoints=endpoints, app=local.address)

    def gauges() -> tuple[float, float]:
        found = scrape(proxy)
        return tuple(found[key("starmesh_active_connections", listener=name)] for name in ("outbound", "inbound"))

    assert gauges() == (0, 0)
    held = []
    for listener, n in (("outbound", 2), ("inbound", 1)):
        host, port = getattr(proxy, listener).rsplit(":", 1)
        held += [socket.create_connection((host, int(port)), timeout=DEADLINE) for _ in range(n)]
    try:
        _wait(lambda: gauges() == (2, 1), "2 outbound and 1 inbound connections")
    finally:
        for sock in held:
            sock.close()
    _wait(lambda: gauges() == (0, 0), "the connections gone from the gauge")

    # A WebSocket through the outbound listener becomes a tunnel: still open, still counted.
    async def websocket() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://{proxy.outbound}/ws", headers={"Host": "api"}) as ws:
                await ws.send_str("hello")
                assert (await ws.receive_str()) == "v1: hello"
                await asyncio.to_thread(_wait, lambda: gauges() == (1, 0), "the tunnel counted")
        await asyncio.to_thread(_wait, lambda: gauges() == (0, 0), "the tunnel's end counted")

    asyncio.run(websocket())


def _wait(check: Callable[[], bool], what: str) -> None:
    """Poll `check` until it holds; fail after DEADLINE seconds."""
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"not within {DEADLINE}s: {what}")
        time.sleep(0.05)
