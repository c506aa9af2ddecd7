"""Chains as RouteTable builds them: which filters a route gets, and real upstreams on loopback.

The end-to-end half runs aiohttp apps on 127.0.0.1:0 behind the real UpstreamPool, and
counts at the upstream what the chain did (tries, mirror copies, headers).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import (
    CircuitBreaker,
    Fault,
    MeshConfig,
    Mirror,
    OutlierDetection,
    Retries,
    Rule,
    Service,
    Spec,
)
from starmesh.runtime.chain import ChainDeps, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.message import FixedBody, Handler, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder


def prepared(rule: Rule | None = None, **svc: Any) -> PreparedService:
    service = Service(versions=("v1", "v2"), **svc)
    routes: dict[str, tuple[Rule, ...]] = {"svc": (rule,)} if rule is not None else {}
    spec = Spec(mesh=MeshConfig(name="m"), services={"svc": service}, routes=routes)
    return prepare_service("svc", service, (rule,) if rule is not None else None, None, spec)


def layers(handler: Callable[..., Any]) -> list[str]:
    """The chain's layers, outermost first, by following each closure's `inner`."""
    names = []
    current: Any = handler
    while current is not None:
        names.append(current.__name__)
        current = _inner(current)
    return names


def _inner(function: Any) -> Any:
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
    if "inner" in cells:
        return cells["inner"].cell_contents
    for cell in cells.values():  # a helper closure holding `inner` (retry's one_try)
        content = cell.cell_contents
        if callable(content) and hasattr(content, "__code__") and "inner" in content.__code__.co_freevars:
            return _inner(content)
    return None


class NullPool:
    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        return Response(200, [], FixedBody(b""))

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


def null_deps() -> ChainDeps:
    return ChainDeps(
        pool=NullPool(), endpoints=Endpoints(), state=StateRegistry(), recorder=MemoryRecorder(), local_service="me"
    )


def test_a_plain_route_gets_only_telemetry_breaker_and_balancer() -> None:
    svc = prepared()
    assert layers(build_outbound(svc, svc.rules[0], null_deps())) == ["telemetry", "breaker", "balance"]


def test_a_full_route_gets_every_filter_in_order() -> None:
    rule = Rule(
        backends={"v1": 90, "v2": 10},
        fault=Fault(abort_status=500, abort_percent=1),
        set_request_headers={"x-a": "1"},
        mirror=Mirror(version="v2", percent=5),
        timeout_ms=1000,
        retries=Retries(attempts=1),
    )
    svc = prepared(rule, outlier_detection=OutlierDetection())
    assert layers(build_outbound(svc, svc.rules[0], null_deps())) == [
        "telemetry",
        "split",
        "inject",
        "mutate_headers",
        "mirrored",
        "retry",  # with retries, the retry filter runs the route's timeout and breaker too
        "balance_observed",
    ]


def test_a_timeout_without_retries_is_its_own_layer() -> None:
    svc = prepared(Rule(timeout_ms=1000))
    assert layers(build_outbound(svc, svc.rules[0], null_deps())) == ["telemetry", "timeout", "breaker", "balance"]


def test_filters_with_nothing_to_do_are_left_out() -> None:
    rule = Rule(fault=Fault(abort_status=500, abort_percent=0), mirror=Mirror(version="v2", percent=0),
                retries=Retries(attempts=0))
    svc = prepared(rule)
    assert layers(build_outbound(svc, svc.rules[0], null_deps())) == ["telemetry", "breaker", "balance"]


# -- real upstreams -------------------------------------------------------------------


class Upstream:
    """An aiohttp app that counts requests and answers per `behave` (a coroutine)."""

    def __init__(self, behave: Callable[[web.Request, int], Awaitable[web.StreamResponse]] | None = None) -> None:
        self.hits = 0
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.behave = behave
        self.address = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.read()
        self.seen.append((request.method, request.host, {k.lower(): v for k, v in request.headers.items()}, body))
        if self.behave is not None:
            return await self.behave(request, self.hits)
        return web.Response(text="ok")


@asynccontextmanager
async def serving(*upstreams: Upstream) -> AsyncIterator[None]:
    runners = []
    try:
        for upstream in upstreams:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", upstream.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            upstream.address = f"127.0.0.1:{port}"
            runners.append(runner)
        yield
    finally:
        for runner in runners:
            await runner.cleanup()


def refused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@asynccontextmanager
async def chain_to(
    endpoints: dict[str, tuple[str, ...]], rule: Rule | None = None, **svc: Any
) -> AsyncIterator[tuple[Handler, UpstreamPool, ChainDeps]]:
    pool = UpstreamPool()
    deps = ChainDeps(
        pool=pool,
        endpoints=Endpoints({"svc": endpoints}),
        state=StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="caller",
        rng=random.Random(5),
    )
    service = prepared(rule, **svc)
    try:
        yield build_outbound(service, service.rules[0], deps), pool, deps
    finally:
        deps.state.mirrors.cancel()
        await pool.close()


def request(method: str = "GET", path: str = "/x", body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> Request:
    return Request(method, path, None, headers or [("host", "svc")], FixedBody(body), service="svc", authority="svc")


async def read_all(response: Response) -> bytes:
    data = response.body.complete()
    if data is not None:
        return data
    parts = []
    while chunk := await response.body.read():
        parts.append(chunk)
    return b"".join(parts)


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        await main()
        for _ in range(3):
            await asyncio.sleep(0)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert leftover == [], f"tasks left behind: {leftover}"

    asyncio.run(checked())


def test_retries_are_counted_at_the_upstream() -> None:
    async def flaky(request: web.Request, hit: int) -> web.StreamResponse:
        return web.Response(status=503 if hit <= 2 else 200, text=f"try {hit}")

    async def main() -> None:
        app = Upstream(flaky)
        async with serving(app), chain_to({"v1": (app.address,)}, Rule(retries=Retries(attempts=3))) as (chain, _, _):
            response = await chain(request())
            assert (response.status, await read_all(response)) == (200, b"try 3")
            assert app.hits == 3

    run(main)


def test_exhausted_retries_pass_the_last_5xx_through() -> None:
    async def broken(request: web.Request, hit: int) -> web.StreamResponse:
        return web.Response(status=502, text=f"bad {hit}", headers={"x-app": "yes"})

    async def main() -> None:
        app = Upstream(broken)
        async with serving(app), chain_to({"v1": (app.address,)}, Rule(retries=Retries(attempts=2))) as (chain, _, _):
            response = await chain(request())
            assert response.status == 502 and response.error == ""
            assert dict(response.headers)["x-app"] == "yes"
            assert await read_all(response) == b"bad 3"
            assert app.hits == 3

    run(main)


def test_post_is_not_retried_after_it_reached_the_upstream() -> None:
    async def broken(request: web.Request, hit: int) -> web.StreamResponse:
        return web.Response(status=503)

    async def main() -> None:
        app = Upstream(broken)
        async with serving(app), chain_to({"v1": (app.address,)}, Rule(retries=Retries(attempts=3))) as (chain, _, _):
            response = await chain(request("POST", body=b"order=1"))
            assert response.status == 503
            assert app.hits == 1

    run(main)


def test_post_is_retried_on_a_connect_failure() -> None:
    async def main() -> None:
        app = Upstream()
        dead = refused_address()
        rule = Rule(retries=Retries(attempts=2, on=("connect-failure",)))
        async with serving(app), chain_to({"v1": (dead, app.address)}, rule) as (chain, _, _):
            for _ in range(4):
                response = await chain(request("POST", body=b"order=1"))
                assert response.status == 200
                await read_all(response)
            assert app.hits == 4
            assert [seen[3] for seen in app.seen] == [b"order=1"] * 4

    run(main)


def test_refused_without_retries_is_503_upstream_unavailable() -> None:
    async def main() -> None:
        async with chain_to({"v1": (refused_address(),)}) as (chain, _, deps):
            response = await chain(request())
            assert (response.status, response.error) == (503, "upstream-unavailable")
            assert deps.recorder.requests_total(reason="upstream-unavailable") == 1  # type: ignore[attr-defined]

    run(main)


def test_a_reset_is_retried_then_answered_upstream_reset() -> None:
    async def main() -> None:
        resets = 0

        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal resets
            await reader.readuntil(b"\r\n\r\n")
            resets += 1
            writer.transport.abort()

        server = await asyncio.start_server(slam, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            rule = Rule(retries=Retries(attempts=2, on=("reset",)))
            async with chain_to({"v1": (f"127.0.0.1:{port}",)}, rule) as (chain, _, _):
                response = await chain(request())
                assert (response.status, response.error) == (503, "upstream-reset")
                assert resets == 3
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_per_try_and_overall_timeouts_leave_nothing_behind() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def stuck(request: web.Request, hit: int) -> web.StreamResponse:
            await release.wait()
            return web.Response(text="late")

        app = Upstream(stuck)
        rule = Rule(timeout_ms=400, retries=Retries(attempts=1, per_try_timeout_ms=100))
        async with serving(app), chain_to({"v1": (app.address,)}, rule) as (chain, pool, deps):
            response = await chain(request())
            assert (response.status, response.error) == (504, "timeout")
            assert app.hits == 2  # two tries, each cut off by the per-try timeout
            # The overall timeout: a request the per-try timeouts cannot finish in time.
            rule2 = Rule(timeout_ms=150, retries=Retries(attempts=5, per_try_timeout_ms=100))
            svc2 = prepared(rule2)
            chain2 = build_outbound(svc2, svc2.rules[0], deps)
            hits = app.hits
            response = await chain2(request())
            assert (response.status, response.error) == (504, "timeout")
            assert 1 <= app.hits - hits <= 2
            assert pool.active(app.address) == 0
            for _ in range(500):  # cancelled exchanges close their sockets
                if pool.connections() == 0:
                    break
                await asyncio.sleep(0.01)
            assert pool.connections() == 0
            budget = deps.state.budget("svc")
            assert (budget.active, budget.retrying) == (0, 0)
            release.set()

    run(main)


def test_breaker_overflow_under_concurrency() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def gated(request: web.Request, hit: int) -> web.StreamResponse:
            await gate.wait()
            return web.Response(text="ok")

        app = Upstream(gated)
        breaker = CircuitBreaker(max_connections=4, max_requests=4, max_pending_requests=2)
        async with serving(app), chain_to({"v1": (app.address,)}, circuit_breaker=breaker) as (chain, _, _):
            tasks = [asyncio.ensure_future(chain(request())) for _ in range(10)]
            for _ in range(2000):
                if app.hits == 4 and sum(t.done() for t in tasks) == 4:
                    break
                await asyncio.sleep(0.001)
            overflowed = [t.result() for t in tasks if t.done()]
            assert [(r.status, r.error) for r in overflowed] == [(503, "overflow")] * 4
            assert app.hits == 4
            gate.set()
            results = await asyncio.gather(*tasks)
            assert sum(1 for r in results if r.status == 200) == 6
            for r in results:
                await read_all(r)
            assert app.hits == 6

    run(main)


def test_mirror_arrives_at_the_shadow_while_the_primary_answers() -> None:
    async def main() -> None:
        primary = Upstream()
        shadow_seen = asyncio.Event()

        async def shadow_behaviour(request: web.Request, hit: int) -> web.StreamResponse:
            shadow_seen.set()
            return web.Response(text="shadow", status=500)

        shadow = Upstream(shadow_behaviour)
        rule = Rule(backends={"v1": 100}, mirror=Mirror(version="v2"))
        async with serving(primary, shadow), chain_to(
            {"v1": (primary.address,), "v2": (shadow.address,)}, rule
        ) as (chain, _, deps):
            response = await chain(request("PUT", body=b"data", headers=[("host", "svc"), ("x-trace", "t1")]))
            assert (response.status, await read_all(response)) == (200, b"ok")
            await asyncio.wait_for(shadow_seen.wait(), 10)
            while deps.state.mirrors.tasks:
                await asyncio.sleep(0.001)
            [(method, host, headers, body)] = shadow.seen
            assert (method, host, body, headers["x-trace"]) == ("PUT", "svc-shadow", b"data", "t1")
            assert primary.hits == 1 and primary.seen[0][1] == "svc"

    run(main)


def test_header_mutation_reaches_the_upstream() -> None:
    async def main() -> None:
        app = Upstream()
        rule = Rule(set_request_headers={"x-env": "canary"}, remove_request_headers=("x-secret",))
        async with serving(app), chain_to({"v1": (app.address,)}, rule) as (chain, _, _):
            response = await chain(request(headers=[("host", "svc"), ("x-secret", "s"), ("x-env", "prod")]))
            await read_all(response)
            [(_, _, headers, _)] = app.seen
            assert headers["x-env"] == "canary" and "x-secret" not in headers

    run(main)


def test_a_failing_endpoint_is_ejected() -> None:
    async def failing(request: web.Request, hit: int) -> web.StreamResponse:
        return web.Response(status=500)

    async def main() -> None:
        good, bad = Upstream(), Upstream(failing)
        od = OutlierDetection(consecutive_5xx=2, base_ejection_time_ms=60_000)
        async with serving(good, bad), chain_to({"v1": (good.address, bad.address)}, outlier_detection=od) as (
            chain,
            _,
            _,
        ):
            for _ in range(20):
                await read_all(await chain(request()))
            assert bad.hits == 2 and good.hits == 18

    run(main)
