"""End to end: routing through real proxies to real apps (header match, split, mirror, headers)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.slow

ROUTED = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [
    rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100}),
    rule(backends = {"v1": 100}),
])
"""


def test_header_routing_through_the_outbound_listener(mesh: Any, h: Any) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    proxy = mesh.proxy(
        "frontend", mesh.bundle(ROUTED), mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [v2.address]}})
    )

    jason = h.many(proxy.outbound, 20, "/reviews/1", host="reviews", headers={"end-user": "jason"})
    alice = h.many(proxy.outbound, 20, "/reviews/1", host="reviews", headers={"end-user": "alice"})
    nobody = h.many(proxy.outbound, 20, "/reviews/1", host="reviews")

    assert [(r.status, r.app) for r in jason] == [(200, "v2")] * 20
    assert [(r.status, r.app) for r in alice + nobody] == [(200, "v1")] * 40
    assert v2.count("GET /reviews/1") == 20
    assert v1.count("GET /reviews/1") == 40


def test_header_names_match_case_insensitively_and_absolute_form_routes(mesh: Any, h: Any) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    proxy = mesh.proxy(
        "frontend", mesh.bundle(ROUTED), mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [v2.address]}})
    )

    upper = h.call(proxy.outbound, "/r", host="reviews", headers={"End-User": "jason"})
    assert (upper.status, upper.app) == (200, "v2")

    # HTTP_PROXY use: the request target names the service.
    raw, closed = h.raw_exchange(
        proxy.outbound,
        b"GET http://reviews/absolute HTTP/1.1\r\nHost: reviews\r\nend-user: jason\r\nConnection: close\r\n\r\n",
    )
    assert h.status_of(raw) == 200, raw[:300]
    assert b"x-app-name: v2" in raw.lower()
    assert closed
    assert v2.count("GET /absolute") == 1


def test_header_routing_through_two_sidecars(mesh: Any, h: Any) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    bundle = mesh.bundle(ROUTED)
    callee_v1 = mesh.start_proxy("reviews", "v1", v1.address, bundle)
    callee_v2 = mesh.start_proxy("reviews", "v2", v2.address, bundle)
    callee_v1.wait_ready()
    callee_v2.wait_ready()
    caller = mesh.proxy(
        "frontend", bundle, mesh.endpoints({"reviews": {"v1": [callee_v1.inbound], "v2": [callee_v2.inbound]}})
    )

    jason = h.many(caller.outbound, 10, "/echo", host="reviews", headers={"end-user": "jason"})
    others = h.many(caller.outbound, 10, "/echo", host="reviews", headers={"end-user": "alice"})

    assert [(r.status, r.app) for r in jason] == [(200, "v2")] * 10
    assert [(r.status, r.app) for r in others] == [(200, "v1")] * 10
    # The request went caller proxy -> callee proxy -> app: the app saw the original path.
    assert v2.count("GET /echo") == 10
    assert v1.count("GET /echo") == 10
    echoed = {k.lower(): v for k, v in jason[0].json()["headers"]}
    assert echoed["end-user"] == "jason"


def test_weighted_split_is_within_binomial_tolerance(mesh: Any, h: Any) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    bundle = mesh.bundle(
        """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {"v1": 90, "v2": 10})])
"""
    )
    proxy = mesh.proxy("frontend", bundle, mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [v2.address]}}))

    n = 1000
    replies = h.many(proxy.outbound, n, "/split", host="reviews", concurrency=32)

    assert Counter(r.status for r in replies) == {200: n}
    answered = Counter(r.app for r in replies)
    assert answered["v1"] + answered["v2"] == n
    ok, why = h.binomial_ok(answered["v2"], n, 0.10)
    assert ok, why
    # The apps agree with what the client saw.
    assert (v1.count("GET /split"), v2.count("GET /split")) == (answered["v1"], answered["v2"])


def test_mirror_traffic_arrives_while_responses_come_from_the_primary(mesh: Any, h: Any) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    bundle = mesh.bundle(
        """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {"v1": 100}, mirror = mirror("v2"))])
"""
    )
    proxy = mesh.proxy("frontend", bundle, mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [v2.address]}}))

    n = 50
    replies = h.many(proxy.outbound, n, "/mirrored", host="reviews", concurrency=2)

    assert [(r.status, r.app) for r in replies] == [(200, "v1")] * n
    assert v1.count("GET /mirrored") == n
    # Mirrors are fire-and-forget: wait for all copies to land at the shadow.
    h.poll_until(lambda: v2.count("GET /mirrored") == n, f"{n} mirrored requests at v2 ({v2.stats()})")
    assert v2.hosts() == {"reviews-shadow": n}


def test_mirror_never_affects_the_response_even_when_the_shadow_fails(mesh: Any, h: Any) -> None:
    v1 = mesh.app("v1")
    shadow = mesh.app("v2", status=500)
    bundle = mesh.bundle(
        """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {"v1": 100}, mirror = mirror("v2"))])
"""
    )
    proxy = mesh.proxy("frontend", bundle, mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [shadow.address]}}))

    replies = h.many(proxy.outbound, 20, "/slow", host="reviews", concurrency=4)

    assert [(r.status, r.app) for r in replies] == [(200, "v1")] * 20
    h.poll_until(lambda: shadow.count("GET /slow") == 20, "20 mirrored requests at the failing shadow")


def test_request_headers_are_set_and_removed(mesh: Any, h: Any) -> None:
    v1 = mesh.app("v1")
    bundle = mesh.bundle(
        """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews")
http_route("reviews", rules = [
    rule(set_request_headers = {"x-added": "yes", "x-replaced": "new"},
         remove_request_headers = ["x-secret"]),
])
"""
    )
    proxy = mesh.proxy("frontend", bundle, mesh.endpoints({"reviews": {"v1": [v1.address]}}))

    reply = h.call(
        proxy.outbound,
        "/echo",
        host="reviews",
        headers={"x-replaced": "old", "x-secret": "hunter2", "x-kept": "kept"},
    )

    assert (reply.status, reply.app) == (200, "v1")
    seen = [(k.lower(), v) for k, v in reply.json()["headers"]]
    names = [k for k, _ in seen]
    assert ("x-added", "yes") in seen
    assert [v for k, v in seen if k == "x-replaced"] == ["new"]
    assert "x-secret" not in names
    assert ("x-kept", "kept") in seen


def test_websocket_upgrade_is_routed_then_tunnelled(mesh: Any, h: Any) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    bundle = mesh.bundle(ROUTED)
    callee = mesh.start_proxy("reviews", "v2", v2.address, bundle)
    callee.wait_ready()
    caller = mesh.proxy("frontend", bundle, mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [callee.inbound]}}))

    async def talk() -> list[str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"http://{caller.outbound}/ws", headers={"Host": "reviews", "end-user": "jason"}
            ) as ws:
                answers = []
                for text in ("one", "two", "three"):
                    await ws.send_str(text)
                    answers.append((await ws.receive_str()))
                return answers

    # Routed by the header to v2, through both sidecars, then spliced byte for byte.
    assert asyncio.run(talk()) == ["v2: one", "v2: two", "v2: three"]
    assert v2.count("GET /ws") == 1
    assert v1.total() == 0


def test_expect_100_continue_then_the_body_reaches_the_app(mesh: Any, h: Any) -> None:
    v1 = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(ROUTED), mesh.endpoints({"reviews": {"v1": [v1.address]}}))
    host, port = proxy.outbound.rsplit(":", 1)

    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n"
        )
        interim = b""
        while b"\r\n\r\n" not in interim:  # the body is held back until the proxy says continue
            chunk = sock.recv(4096)
            assert chunk, interim
            interim += chunk
        assert h.status_of(interim) == 100, interim
        head_end = interim.index(b"\r\n\r\n") + 4
        sock.sendall(b"hello")
        rest = interim[head_end:]
        while chunk := sock.recv(65536):
            rest += chunk

    assert h.status_of(rest) == 200, rest[:300]
    assert b'"body": "hello"' in rest
    assert v1.count("POST /echo") == 1
