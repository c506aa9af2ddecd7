"""Load balancing (round robin, least request, random) and outlier detection with a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import LoadBalancer, MeshConfig, OutlierDetection, Retries, Rule, Service, Spec
from starmesh.runtime.chain import ChainDeps, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.filters.outlier import OutlierState
from starmesh.runtime.http.errors import UpstreamError
from starmesh.runtime.message import FixedBody, Handler, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

V1 = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80")
V2 = ("10.0.1.1:80",)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pool:
    """Answers 200, or 500 for endpoints in `failing`, or raises for `refusing`."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.refusing: set[str] = set()
        self.hits: Counter[str] = Counter()
        self.load: dict[str, int] = {}

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        self.hits[endpoint] += 1
        if endpoint in self.refusing:
            raise UpstreamError("upstream-unavailable", "connection refused", sent=False)
        return Response(500 if endpoint in self.failing else 200, [], FixedBody(b""), endpoint=endpoint)

    def active(self, endpoint: str) -> int:
        return self.load.get(endpoint, 0)

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


def prepared(lb: LoadBalancer = "round_robin", rule: Rule | None = None, **svc: Any) -> PreparedService:
    service = Service(versions=("v1", "v2"), load_balancer=lb, **svc)
    spec = Spec(mesh=MeshConfig(name="m"), services={"svc": service}, routes={"svc": (rule,)} if rule else {})
    return prepare_service("svc", service, (rule,) if rule else None, None, spec)


def make(
    pool: Pool, lb: LoadBalancer = "round_robin", *, clock: Clock | None = None, state: StateRegistry | None = None,
    rule: Rule | None = None, endpoints: dict[str, tuple[str, ...]] | None = None, **svc: Any,
) -> Handler:
    service = prepared(lb, rule, **svc)
    deps = ChainDeps(
        pool=pool,
        endpoints=Endpoints({"svc": endpoints if endpoints is not None else {"v1": V1, "v2": V2}}),
        state=state or StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="caller",
        rng=random.Random(42),
        clock=clock or Clock(),
    )
    return build_outbound(service, service.rules[0], deps)


def send(handler: Handler, n: int) -> list[Response]:
    async def main() -> list[Response]:
        return [await handler(Request("GET", "/", None, [], FixedBody(b""), service="svc")) for _ in range(n)]

    return asyncio.run(main())


def test_round_robin_takes_turns_over_the_picked_version() -> None:
    pool = Pool()
    responses = send(make(pool, rule=Rule(backends={"v1": 100})), 8)
    assert [r.endpoint for r in responses] == list(V1) * 2


def test_no_backends_means_every_version() -> None:
    pool = Pool()
    send(make(pool), 50)
    assert set(pool.hits) == set(V1) | set(V2)
    assert all(n == 10 for n in pool.hits.values())


def test_random_spreads_evenly() -> None:
    pool = Pool()
    send(make(pool, "random", rule=Rule(backends={"v1": 100})), 4000)
    assert set(pool.hits) == set(V1)
    assert all(abs(n - 1000) < 5 * (4000 * 0.25 * 0.75) ** 0.5 for n in pool.hits.values()), pool.hits


def test_least_request_prefers_the_idle_endpoint() -> None:
    pool = Pool()
    pool.load = {V1[0]: 50, V1[1]: 50, V1[2]: 50, V1[3]: 0}
    send(make(pool, "least_request", rule=Rule(backends={"v1": 100})), 2000)
    # Power of two choices: the idle endpoint wins every draw it is in (1 - 3/4 * 2/3 = 1/2).
    assert pool.hits[V1[3]] > 850
    busy = [pool.hits[e] for e in V1[:3]]
    assert all(250 < n < 420 for n in busy), pool.hits


def test_a_version_without_endpoints_is_503_no_healthy_upstream() -> None:
    pool = Pool()
    [response] = send(make(pool, rule=Rule(backends={"v2": 100}), endpoints={"v1": V1}), 1)
    assert (response.status, response.error) == (503, "no-healthy-upstream")
    assert not pool.hits


def test_consecutive_5xx_eject_then_readmit_after_the_ejection_time() -> None:
    pool = Pool()
    clock = Clock()
    od = OutlierDetection(consecutive_5xx=3, base_ejection_time_ms=30_000, interval_ms=10_000, max_ejection_percent=50)
    handler = make(pool, clock=clock, rule=Rule(backends={"v1": 100}), outlier_detection=od)
    pool.failing = {V1[0]}
    send(handler, 12)  # V1[0] answers 500 three times in a row
    assert pool.hits[V1[0]] == 3
    pool.hits.clear()
    send(handler, 30)
    assert V1[0] not in pool.hits and sum(pool.hits.values()) == 30
    clock.now += 29.9
    pool.hits.clear()
    send(handler, 30)
    assert V1[0] not in pool.hits
    clock.now += 0.1  # the ejection ends: back in rotation
    pool.failing.clear()
    pool.hits.clear()
    send(handler, 40)
    assert pool.hits[V1[0]] == 10


def test_ejection_time_grows_with_each_ejection_and_upstream_errors_count() -> None:
    pool = Pool()
    clock = Clock()
    state = StateRegistry()
    od = OutlierDetection(consecutive_5xx=2, base_ejection_time_ms=10_000, interval_ms=600_000, max_ejection_percent=50)
    handler = make(pool, clock=clock, state=state, rule=Rule(backends={"v1": 100}), outlier_detection=od)
    pool.refusing = {V1[1]}
    responses = send(handler, 8)
    assert sum(1 for r in responses if r.error == "upstream-unavailable") == 2
    outliers = state.outliers("svc", od)
    assert outliers.ejected == {V1[1]: clock.now + 10.0}
    clock.now += 10.0
    send(handler, 8)  # re-admitted, fails twice more: ejected for 2 x base
    assert outliers.ejected == {V1[1]: clock.now + 20.0}


def test_ejection_count_fades_with_healthy_intervals() -> None:
    state = OutlierState(OutlierDetection(consecutive_5xx=1, base_ejection_time_ms=1000, interval_ms=1000))
    eps = V1
    assert state.failure(eps[0], eps, 0.0)
    assert state.ejected[eps[0]] == 1.0
    state.admitted(eps, 1.0)
    assert state.failure(eps[0], eps, 1.5)  # quickly again: 2 x base
    assert state.ejected[eps[0]] == 3.5
    state.admitted(eps, 3.5)
    assert state.failure(eps[0], eps, 10.0)  # 6.5 healthy intervals later: back to 1 x base
    assert state.ejected[eps[0]] == 11.0


def test_max_ejection_percent_and_the_last_endpoint_are_kept() -> None:
    pool = Pool()
    state = StateRegistry()
    od = OutlierDetection(consecutive_5xx=1, max_ejection_percent=50)
    handler = make(pool, state=state, rule=Rule(backends={"v1": 100}), outlier_detection=od)
    pool.failing = set(V1)
    send(handler, 40)
    assert len(state.outliers("svc", od).ejected) == 2  # 50% of 4
    od_all = OutlierDetection(consecutive_5xx=1, max_ejection_percent=100)
    failing = Pool()
    failing.failing = set(V2)
    state2 = StateRegistry()
    handler2 = make(failing, state=state2, rule=Rule(backends={"v2": 100}), outlier_detection=od_all)
    responses = send(handler2, 10)
    assert all(r.status == 500 and r.error == "" for r in responses)  # never no-healthy-upstream
    assert not state2.outliers("svc", od_all).ejected


def test_outlier_state_survives_a_rebuild_for_endpoints_that_remain() -> None:
    pool = Pool()
    clock = Clock()
    state = StateRegistry()
    od = OutlierDetection(consecutive_5xx=1)
    first = make(pool, clock=clock, state=state, rule=Rule(backends={"v1": 100}), outlier_detection=od)
    pool.failing = {V1[2]}
    send(first, 4)
    second = make(pool, clock=clock, state=state, rule=Rule(backends={"v1": 100}), outlier_detection=od)
    pool.hits.clear()
    send(second, 12)
    assert V1[2] not in pool.hits
    state.retain(["svc"], frozenset(V1[:2]))
    assert not state.outliers("svc", od).ejected


def test_retry_with_outlier_detection_sees_upstream_errors() -> None:
    pool = Pool()
    pool.refusing = {V1[0]}
    handler = make(
        pool,
        rule=Rule(backends={"v1": 100}, retries=Retries(attempts=2)),
        outlier_detection=OutlierDetection(consecutive_5xx=1),
    )
    responses = send(handler, 4)
    assert all(r.status == 200 for r in responses)


@pytest.mark.parametrize("lb", ["round_robin", "least_request", "random"])
def test_every_algorithm_skips_ejected_endpoints(lb: LoadBalancer) -> None:
    pool = Pool()
    pool.failing = {V1[0]}
    handler = make(pool, lb, rule=Rule(backends={"v1": 100}), outlier_detection=OutlierDetection(consecutive_5xx=1))
    send(handler, 20)
    pool.hits.clear()
    send(handler, 100)
    assert V1[0] not in pool.hits
