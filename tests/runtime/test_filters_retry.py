"""Retries, the retry budget, backoff and the request timeout, with a scripted upstream."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import MeshConfig, Retries, RetryOn, Service, Spec
from starmesh.runtime.chain import ChainDeps, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.filters.circuit_breaker import DEFAULT_BREAKER
from starmesh.runtime.filters.replay import Recording
from starmesh.runtime.filters.retry import BACKOFF_BASE, BACKOFF_CAP, RetryBudget, backoff, retry_filter
from starmesh.runtime.filters.timeout import RouteTimeout
from starmesh.runtime.http.errors import UpstreamError
from starmesh.runtime.message import Body, FixedBody, Handler, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

Script = Callable[[str, Request], Awaitable[Response]]


class FakePool:
    """Answers with `script`; records every call (endpoint, method, body bytes)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[tuple[str, str, bytes]] = []

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        data = request.body.complete()
        if data is None:
            parts = []
            while chunk := await request.body.read():
                parts.append(chunk)
            data = b"".join(parts)
        self.calls.append((endpoint, request.method, data))
        return await self.script(endpoint, request)

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


class ClosingBody(FixedBody):
    closed = 0

    def close(self) -> None:
        ClosingBody.closed += 1
        super().close()


def status(code: int, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(code, headers or [], ClosingBody(b"x"))


def service(**retry: Any) -> PreparedService:
    svc = Service(versions=("v1",), retries=Retries(**retry) if retry else None)
    spec = Spec(mesh=MeshConfig(name="m"), services={"svc": svc})
    return prepare_service("svc", svc, None, None, spec)


def deps_for(pool: FakePool, *, sleeps: list[float] | None = None, seed: int = 1) -> ChainDeps:
    async def fake_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return ChainDeps(
        pool=pool,
        endpoints=Endpoints({"svc": {"v1": ("10.0.0.1:80",)}}),
        state=StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="caller",
        rng=random.Random(seed),
        sleep=fake_sleep,
    )


def chain(pool: FakePool, sleeps: list[float] | None = None, **retry: Any) -> Handler:
    svc = service(**retry)
    return build_outbound(svc, svc.rules[0], deps_for(pool, sleeps=sleeps))


def request(method: str = "GET", body: Body | None = None) -> Request:
    return Request(method, "/", None, [("host", "svc")], body or FixedBody(b""), service="svc")


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        result = await coro
        await asyncio.sleep(0)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert leftover == [], f"tasks left behind: {leftover}"
        return result

    return asyncio.run(main())


def answers(*outcomes: Response | UpstreamError) -> Script:
    queue = list(outcomes)

    async def script(endpoint: str, req: Request) -> Response:
        outcome = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(outcome, UpstreamError):
            raise outcome
        return outcome

    return script


def test_5xx_is_retried_attempts_times_then_passed_through() -> None:
    pool = FakePool(answers(status(503, [("x-app", "1")])))
    response = run(chain(pool, attempts=2)(request()))
    assert len(pool.calls) == 3
    assert response.status == 503 and response.error == "" and response.headers == [("x-app", "1")]


def test_retry_stops_at_the_first_success_and_closes_bodies_it_skips() -> None:
    ClosingBody.closed = 0
    pool = FakePool(answers(status(500), status(502), status(200)))
    response = run(chain(pool, attempts=5)(request()))
    assert (response.status, len(pool.calls)) == (200, 3)
    assert ClosingBody.closed == 2


def test_no_retries_configured_means_one_try_and_mapped_errors() -> None:
    pool = FakePool(answers(UpstreamError("upstream-reset", "reset", sent=True)))
    response = run(chain(pool)(request()))
    assert len(pool.calls) == 1
    assert (response.status, response.error) == (503, "upstream-reset")


@pytest.mark.parametrize(
    ("reason", "expected"), [("upstream-unavailable", "upstream-unavailable"), ("upstream-reset", "upstream-reset")]
)
def test_tries_run_out_on_upstream_errors(reason: str, expected: str) -> None:
    pool = FakePool(answers(UpstreamError(reason, "boom", sent=False)))  # type: ignore[arg-type]
    response = run(chain(pool, attempts=3)(request()))
    assert len(pool.calls) == 4
    assert (response.status, response.error) == (503, expected)


def test_on_conditions_select_what_is_retried() -> None:
    peer_reset = status(503, [("x-starmesh-error", "upstream-reset")])
    peer_refused = status(503, [("x-starmesh-error", "upstream-unavailable")])
    cases: list[tuple[tuple[RetryOn, ...], Response | UpstreamError, int]] = [
        (("connect-failure",), status(500), 1),
        (("connect-failure",), peer_refused, 3),
        (("connect-failure",), peer_reset, 1),
        (("connect-failure",), UpstreamError("upstream-unavailable", "refused", sent=False), 3),
        (("connect-failure",), UpstreamError("upstream-reset", "reset", sent=True), 1),
        (("reset",), peer_reset, 3),
        (("reset",), UpstreamError("upstream-reset", "reset", sent=True), 3),
        (("reset",), status(502), 1),
        (("5xx",), status(502), 3),
        (("5xx",), UpstreamError("upstream-reset", "reset", sent=True), 3),
        (("5xx",), status(429), 1),
    ]
    for on, outcome, tries in cases:
        pool = FakePool(answers(outcome))
        run(chain(pool, attempts=2, on=on)(request()))
        assert len(pool.calls) == tries, (on, outcome)


def test_post_is_not_retried_once_it_reached_the_upstream() -> None:
    for outcome in (status(503), UpstreamError("upstream-reset", "reset mid-request", sent=True)):
        pool = FakePool(answers(outcome))
        run(chain(pool, attempts=3)(request("POST", FixedBody(b"order"))))
        assert len(pool.calls) == 1


def test_post_is_retried_when_it_never_left() -> None:
    pool = FakePool(answers(UpstreamError("upstream-unavailable", "refused", sent=False), status(201)))
    response = run(chain(pool, attempts=3)(request("POST", FixedBody(b"order"))))
    assert response.status == 201
    assert [call[2] for call in pool.calls] == [b"order", b"order"]


def test_put_is_idempotent_and_retried_after_a_5xx() -> None:
    pool = FakePool(answers(status(503), status(200)))
    assert run(chain(pool, attempts=1)(request("PUT", FixedBody(b"v")))).status == 200
    assert len(pool.calls) == 2


class ChunkedBody:
    """A streamed body (complete() is None) of the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.length: int | None = None

    def complete(self) -> bytes | None:
        return None

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def close(self) -> None:
        self.chunks.clear()


def test_a_streamed_body_is_replayed_on_a_retry() -> None:
    pool = FakePool(answers(status(503), status(200)))
    body = ChunkedBody([b"a" * 1000, b"b" * 1000])
    response = run(chain(pool, attempts=2)(request("PUT", body)))
    assert response.status == 200
    assert [call[2] for call in pool.calls] == [b"a" * 1000 + b"b" * 1000] * 2


def test_a_streamed_body_past_the_bound_is_not_retried() -> None:
    pool = FakePool(answers(status(503), status(200)))
    body = ChunkedBody([b"a" * 40_000, b"b" * 40_000])
    response = run(chain(pool, attempts=2)(request("PUT", body)))
    assert response.status == 503
    assert len(pool.calls) == 1


def test_replay_resumes_a_body_the_first_try_did_not_finish() -> None:
    async def main() -> list[bytes]:
        recording = Recording(ChunkedBody([b"one", b"two", b"three"]))
        first = recording.body()
        assert await first.read() == b"one"
        second = recording.body()
        out = []
        while chunk := await second.read():
            out.append(chunk)
        assert recording.body().complete() == b"onetwothree"
        return out

    assert asyncio.run(main()) == [b"one", b"two", b"three"]


def test_backoff_is_full_jitter_within_base_and_cap() -> None:
    assert backoff(0, 0.0) == 0.0
    assert backoff(0, 0.999) < BACKOFF_BASE
    assert backoff(1, 0.999) < 2 * BACKOFF_BASE
    assert backoff(3, 0.999) < BACKOFF_CAP and backoff(3, 0.999) > 4 * BACKOFF_BASE
    assert backoff(30, 0.999) < BACKOFF_CAP
    sleeps: list[float] = []
    pool = FakePool(answers(status(503)))
    run(chain(pool, sleeps, attempts=6)(request()))
    ceilings = [min(BACKOFF_CAP, BACKOFF_BASE * 2**n) for n in range(6)]
    assert len(sleeps) == 6
    assert all(0 <= s < c for s, c in zip(sleeps, ceilings, strict=True)), sleeps


def test_retry_budget_limits_concurrent_retries() -> None:
    async def main() -> tuple[int, int]:
        gate = asyncio.Event()
        all_in = asyncio.Event()
        first_tries = 0

        async def script(endpoint: str, req: Request) -> Response:
            nonlocal first_tries
            if req.attempt == 0:
                first_tries += 1
                if first_tries == 30:
                    all_in.set()
                await all_in.wait()  # all 30 requests are in flight before any fails
                return status(503)
            await gate.wait()  # retries hold their budget slot until released
            return status(200)

        pool = FakePool(script)
        svc = service(attempts=1, budget_percent=20)
        handler = build_outbound(svc, svc.rules[0], deps_for(pool))
        tasks = [asyncio.ensure_future(handler(request())) for _ in range(30)]
        await all_in.wait()
        for _ in range(10):
            await asyncio.sleep(0)
        retries_started = len(pool.calls) - 30
        gate.set()
        results = await asyncio.gather(*tasks)
        return retries_started, sum(1 for r in results if r.status == 200)

    retries_started, succeeded = asyncio.run(main())
    # 30 requests in flight at 20% allow max(3, 6) = 6 concurrent retries.
    assert retries_started == 6
    assert succeeded == 6


def test_budget_always_allows_three() -> None:
    budget = RetryBudget()
    budget.active = 1
    assert budget.allows(0)
    budget.retrying = 3
    assert not budget.allows(0)
    budget.active, budget.retrying = 100, 19
    assert budget.allows(20)
    budget.retrying = 20
    assert not budget.allows(20)


def test_per_try_timeout_cuts_a_try_and_retries_it() -> None:
    async def script(endpoint: str, req: Request) -> Response:
        if req.attempt < 2:
            await asyncio.Event().wait()  # hangs until cancelled
        return status(200)

    pool = FakePool(script)
    response = run(chain(pool, attempts=3, per_try_timeout_ms=20)(request()))
    assert (response.status, len(pool.calls)) == (200, 3)


def test_per_try_timeouts_running_out_answer_504() -> None:
    async def script(endpoint: str, req: Request) -> Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    pool = FakePool(script)
    response = run(chain(pool, attempts=1, per_try_timeout_ms=10)(request()))
    assert (response.status, response.error, len(pool.calls)) == (504, "timeout", 2)


def test_overall_timeout_bounds_every_try() -> None:
    async def script(endpoint: str, req: Request) -> Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    svc_spec = Service(versions=("v1",), timeout_ms=50, retries=Retries(attempts=100, per_try_timeout_ms=15))
    spec = Spec(mesh=MeshConfig(name="m"), services={"svc": svc_spec})
    svc = prepare_service("svc", svc_spec, None, None, spec)
    pool = FakePool(script)
    deps = deps_for(pool)
    deps = ChainDeps(**{**deps.__dict__, "sleep": asyncio.sleep})
    response = run(build_outbound(svc, svc.rules[0], deps)(request()))
    assert (response.status, response.error) == (504, "timeout")
    assert 2 <= len(pool.calls) < 100
    assert deps.state.budget("svc").active == 0 and deps.state.budget("svc").retrying == 0


def test_timeout_without_retries_cancels_the_upstream_call() -> None:
    cancelled = asyncio.Event()

    async def main() -> Response:
        async def script(endpoint: str, req: Request) -> Response:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            raise AssertionError("unreachable")

        svc_spec = Service(versions=("v1",), timeout_ms=20)
        spec = Spec(mesh=MeshConfig(name="m"), services={"svc": svc_spec})
        svc = prepare_service("svc", svc_spec, None, None, spec)
        deps = deps_for(FakePool(script))
        req = request()
        response = await build_outbound(svc, svc.rules[0], deps)(req)
        assert req.deadline is not None
        assert deps.state.breaker("svc", DEFAULT_BREAKER).active == 0
        return response

    response = run(main())
    assert (response.status, response.error) == (504, "timeout")
    assert cancelled.is_set()


def test_retry_filter_is_left_out_without_retries() -> None:
    assert retry_filter(None, RetryBudget(), rng=random.Random(), sleep=asyncio.sleep) is None
    assert retry_filter(Retries(attempts=0), RetryBudget(), rng=random.Random(), sleep=asyncio.sleep) is None


def _timed_retry(timeout_ms: int, inner: Handler) -> Handler:
    """A retry filter that also runs the route's timeout (as build_outbound wires it)."""
    wrap = retry_filter(
        Retries(attempts=1), RetryBudget(), rng=random.Random(1), sleep=asyncio.sleep, timeout=RouteTimeout(timeout_ms)
    )
    assert wrap is not None
    return wrap(inner)


def test_a_fused_timeout_answers_504_when_the_inner_code_swallows_its_cancellation() -> None:
    async def swallow(req: Request) -> Response:
        assert req.deadline is not None  # the timeout's deadline is set before the tries
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        return status(200)

    closed = ClosingBody.closed
    response = run(_timed_retry(20, swallow)(request()))
    assert (response.status, response.error) == (504, "timeout")
    assert ClosingBody.closed == closed + 1  # the swallowed answer's body is closed


def test_a_fused_timeout_does_not_turn_a_client_cancellation_into_a_504() -> None:
    async def hang(req: Request) -> Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def main() -> None:
        task = asyncio.ensure_future(_timed_retry(10_000, hang)(request()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
