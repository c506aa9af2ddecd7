"""The circuit breaker: exact overflow counts under concurrency, a bounded FIFO pending queue."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import CircuitBreaker, MeshConfig, Retries, Service, Spec
from starmesh.runtime.chain import ChainDeps, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.filters.circuit_breaker import BreakerState
from starmesh.runtime.message import FixedBody, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder


class GatedPool:
    """Every call waits for `gate`; `entered` counts calls that reached the upstream."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0
        self.order: list[str] = []

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        self.entered += 1
        self.order.append(request.path)
        await self.gate.wait()
        return Response(200, [], FixedBody(b"ok"))

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


RETRIES = [None, Retries(attempts=2)]
"""Without retries the breaker is a layer of its own; with them the retry filter holds the slots."""


def service(timeout_ms: int | None = None, retries: Retries | None = None, **breaker: Any) -> PreparedService:
    svc = Service(
        circuit_breaker=CircuitBreaker(**breaker) if breaker else None, timeout_ms=timeout_ms, retries=retries
    )
    spec = Spec(mesh=MeshConfig(name="m"), services={"svc": svc})
    return prepare_service("svc", svc, None, None, spec)


def deps_for(pool: GatedPool, state: StateRegistry | None = None) -> ChainDeps:
    return ChainDeps(
        pool=pool,
        endpoints=Endpoints({"svc": {"v1": ("10.0.0.1:80",)}}),
        state=state or StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="caller",
        rng=random.Random(1),
    )


def request(path: str = "/") -> Request:
    return Request("GET", path, None, [("host", "svc")], FixedBody(b""), service="svc")


async def settle(pool: GatedPool, want: int) -> None:
    for _ in range(1000):
        if pool.entered >= want:
            break
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("retries", RETRIES)
def test_overflow_is_exact_under_concurrency(retries: Retries | None) -> None:
    async def main() -> None:
        pool = GatedPool()
        deps = deps_for(pool)
        svc = service(retries=retries, max_requests=5, max_connections=100, max_pending_requests=3)
        handler = build_outbound(svc, svc.rules[0], deps)
        tasks = [asyncio.ensure_future(handler(request(f"/{i}"))) for i in range(20)]
        await settle(pool, 5)
        done = [t for t in tasks if t.done()]
        assert pool.entered == 5
        assert len(done) == 12
        assert all(t.result().status == 503 and t.result().error == "overflow" for t in done)
        breaker = deps.state.breaker("svc", CircuitBreaker(max_requests=5, max_connections=100, max_pending_requests=3))
        assert (breaker.active, len(breaker.waiters)) == (5, 3)
        pool.gate.set()
        results = await asyncio.gather(*tasks)
        assert sum(1 for r in results if r.status == 200) == 8
        assert pool.entered == 8
        # FIFO: the waiters got in in the order they queued.
        assert pool.order[5:] == ["/5", "/6", "/7"]
        assert (breaker.active, len(breaker.waiters)) == (0, 0)

    asyncio.run(main())


def test_max_connections_caps_in_flight_too() -> None:
    async def main() -> None:
        pool = GatedPool()
        svc = service(max_requests=100, max_connections=2, max_pending_requests=0)
        handler = build_outbound(svc, svc.rules[0], deps_for(pool))
        tasks = [asyncio.ensure_future(handler(request())) for _ in range(6)]
        await settle(pool, 2)
        assert pool.entered == 2 and sum(1 for t in tasks if t.done()) == 4
        pool.gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


@pytest.mark.parametrize("retries", RETRIES)
def test_waiting_ends_at_the_deadline_and_leaves_no_waiter(retries: Retries | None) -> None:
    async def main() -> None:
        pool = GatedPool()
        deps = deps_for(pool)
        svc = service(timeout_ms=30, retries=retries, max_requests=1, max_connections=1, max_pending_requests=10)
        handler = build_outbound(svc, svc.rules[0], deps)
        results = await asyncio.gather(*(handler(request()) for _ in range(4)))
        assert [(r.status, r.error) for r in results] == [(504, "timeout")] * 4
        assert pool.entered == 1
        breaker = deps.state.breaker("svc", CircuitBreaker(max_requests=1, max_connections=1, max_pending_requests=10))
        assert (breaker.active, len(breaker.waiters)) == (0, 0)
        await asyncio.sleep(0)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())


def test_unconfigured_service_gets_the_default_bound() -> None:
    async def main() -> None:
        pool = GatedPool()
        deps = deps_for(pool)
        svc = service()
        handler = build_outbound(svc, svc.rules[0], deps)
        tasks = [asyncio.ensure_future(handler(request())) for _ in range(1024 + 1024 + 5)]
        await settle(pool, 1024)
        assert pool.entered == 1024
        assert sum(1 for t in tasks if t.done()) == 5
        pool.gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_breaker_state_survives_a_rebuild_and_takes_new_limits() -> None:
    async def main() -> None:
        pool = GatedPool()
        state = StateRegistry()
        old = service(max_requests=1, max_connections=1, max_pending_requests=5)
        first = build_outbound(old, old.rules[0], deps_for(pool, state))
        tasks = [asyncio.ensure_future(first(request())) for _ in range(3)]
        await settle(pool, 1)
        assert pool.entered == 1
        # An apply with higher limits lets the waiters in at once; same state object.
        new = service(max_requests=10, max_connections=10, max_pending_requests=5)
        build_outbound(new, new.rules[0], deps_for(pool, state))
        await settle(pool, 3)
        assert pool.entered == 3
        pool.gate.set()
        await asyncio.gather(*tasks)
        assert state.breaker("svc", CircuitBreaker()).active == 0

    asyncio.run(main())


def test_a_slot_granted_to_a_cancelled_waiter_passes_on() -> None:
    async def main() -> None:
        state = BreakerState("svc", CircuitBreaker(max_requests=1, max_connections=1, max_pending_requests=5))
        state.active = 1
        first = asyncio.create_task(state.wait())
        second = asyncio.create_task(state.wait())
        await asyncio.sleep(0)
        state.release()  # hands the slot to `first` ...
        first.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await second
        assert state.active == 1 and not state.waiters

    asyncio.run(main())
