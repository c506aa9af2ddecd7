"""End to end: answers the proxy makes itself, and bad input at the outbound listener."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SERVICES = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews")
service(name = "empty")
service(name = "down")
http_route("reviews", rules = [rule(match = [match(path_prefix = "/api")])])
"""


def test_not_ready_before_config_then_ready_after_sighup(mesh: Any, h: Any, tmp_path: Any) -> None:
    app = mesh.app("v1")
    bundle = tmp_path / "later.json"
    bundle.write_text("this is not a bundle\n")
    proxy = mesh.start_proxy("frontend", "v1", "127.0.0.1:9", bundle, mesh.endpoints({"reviews": {"v1": [app.address]}}))

    assert not proxy.ready()
    reply = h.call(proxy.outbound, "/api", host="reviews")
    assert (reply.status, reply.error) == (503, "not-ready")
    assert app.total() == 0

    bundle.write_bytes(mesh.bundle(SERVICES).read_bytes())
    proxy.reload()
    proxy.wait_ready()

    assert proxy.config()["origin"] == "file"
    assert h.call(proxy.outbound, "/api", host="reviews").status == 200
    assert app.count("GET /api") == 1


def test_unknown_host_and_unmatched_path_are_no_route(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(SERVICES), mesh.endpoints({"reviews": {"v1": [app.address]}}))

    unknown = h.call(proxy.outbound, "/api", host="nosuchservice")
    unmatched = h.call(proxy.outbound, "/elsewhere", host="reviews")

    assert (unknown.status, unknown.error) == (404, "no-route")
    assert (unmatched.status, unmatched.error) == (404, "no-route")
    assert app.total() == 0


def test_version_without_endpoints_is_no_healthy_upstream(mesh: Any, h: Any) -> None:
    proxy = mesh.proxy("frontend", mesh.bundle(SERVICES), mesh.endpoints({}))

    reply = h.call(proxy.outbound, "/", host="empty")

    assert (reply.status, reply.error) == (503, "no-healthy-upstream")


def test_app_down_is_upstream_unavailable_on_both_sides(mesh: Any, h: Any) -> None:
    gone = mesh.app("gone")
    address = gone.address
    gone.process.stop()
    proxy = mesh.proxy("down", mesh.bundle(SERVICES), mesh.endpoints({"down": {"v1": [address]}}), app=address)

    outbound = h.call(proxy.outbound, "/", host="down")
    inbound = h.call(proxy.inbound, "/", host="down")

    assert (outbound.status, outbound.error) == (503, "upstream-unavailable")
    assert (inbound.status, inbound.error) == (503, "upstream-unavailable")


def test_app_reset_is_upstream_reset_at_the_receiving_side(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("reviews", mesh.bundle(SERVICES), app=app.address)

    reply = h.call(proxy.inbound, "/reset", host="reviews")

    assert (reply.status, reply.error) == (503, "upstream-reset")
    assert app.count("GET /reset") == 1


GOOD = b"GET /api HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n"

BAD_INPUT = {
    "malformed request line": (b"THIS IS NOT HTTP\r\n\r\n", 400),
    "oversize header": (b"GET /api HTTP/1.1\r\nHost: reviews\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
    "too many headers": (
        b"GET /api HTTP/1.1\r\nHost: reviews\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(500)) + b"\r\n",
        431,
    ),
    "content-length with transfer-encoding": (
        b"POST /api HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two different content-lengths": (
        b"POST /api HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
}


def test_bad_input_is_refused_and_the_connection_closed(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(SERVICES), mesh.endpoints({"reviews": {"v1": [app.address]}}))

    for name, (data, status) in BAD_INPUT.items():
        raw, closed = h.raw_exchange(proxy.outbound, data)
        assert h.status_of(raw) == status, f"{name}: {raw[:200]!r}"
        assert closed, f"{name}: connection left open"
        # The proxy still serves the next good request.
        good, _ = h.raw_exchange(proxy.outbound, GOOD)
        assert h.status_of(good) == 200, f"after {name}: {good[:200]!r}"

    # None of the bad requests reached the app.
    assert app.stats() == {"GET /api": len(BAD_INPUT)}


def test_slow_headers_get_408_while_others_are_served(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy(
        "frontend",
        mesh.bundle(SERVICES),
        mesh.endpoints({"reviews": {"v1": [app.address]}}),
        extra=["--header-timeout", "2"],
    )
    host, port = proxy.outbound.rsplit(":", 1)

    async def slowloris() -> tuple[bytes, int]:
        """Trickle header lines, one every 0.2s, until the proxy gives up on the head."""
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /api HTTP/1.1\r\nHost: reviews\r\n")
        received = b""
        sent = 0
        try:
            async with asyncio.timeout(60):  # a guard against a proxy that never gives up
                while True:
                    try:
                        chunk = await asyncio.wait_for(reader.read(65536), 0.2)
                    except TimeoutError:
                        writer.write(b"x-slow-%d: 1\r\n" % sent)
                        sent += 1
                        if sent == 5:
                            # Meanwhile another connection is served normally.
                            good = await asyncio.to_thread(h.raw_exchange, proxy.outbound, GOOD)
                            assert h.status_of(good[0]) == 200
                        continue
                    if not chunk:
                        return received, sent
                    received += chunk
        finally:
            writer.close()

    received, sent = asyncio.run(slowloris())

    assert h.status_of(received) == 408, received[:200]
    assert sent >= 5
    assert app.stats() == {"GET /api": 1}


def test_request_bodies_over_max_request_body_get_413(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy(
        "frontend",
        mesh.bundle(SERVICES),
        mesh.endpoints({"reviews": {"v1": [app.address]}}),
        extra=["--max-request-body", "1000"],
    )
    head = b"POST /api HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
    small = h.raw_exchange(proxy.outbound, head % 1000 + b"a" * 1000)[0]
    large = h.raw_exchange(proxy.outbound, head % 1001 + b"a" * 1001)[0]
    assert h.status_of(small) == 200, small[:200]
    assert h.status_of(large) == 413, large[:200]
    assert app.stats() == {"POST /api": 1}
