"""The receiving side: authorization (enforce, audit), the token bucket, the app hop, telemetry."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import Allow, Authorization, MeshConfig, RateLimit, Service, Spec
from starmesh.runtime.chain import ChainDeps, build_inbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.errors import UpstreamError
from starmesh.runtime.message import FixedBody, Handler, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

APP = "127.0.0.1:9080"


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class App:
    """The local app: answers 200, or raises `error` when set; counts what reached it."""

    def __init__(self) -> None:
        self.reached = 0
        self.error: UpstreamError | None = None
        self.endpoints: list[str] = []

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        self.endpoints.append(endpoint)
        if self.error is not None:
            raise self.error
        self.reached += 1
        await asyncio.sleep(0)
        return Response(200, [], FixedBody(b"app"))

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


def spec_of(**kwargs: Any) -> Spec:
    return Spec(mesh=MeshConfig(name="m"), services={"ratings": Service(**kwargs.pop("service", {}))}, **kwargs)


def prepared(spec: Spec) -> PreparedService:
    return DecisionTable.build(spec).service("ratings")


def make(
    service: PreparedService | None, app: App, *, clock: Clock | None = None, state: StateRegistry | None = None,
    recorder: MemoryRecorder | None = None,
) -> Handler:
    deps = ChainDeps(
        pool=app,
        endpoints=Endpoints(),
        state=state or StateRegistry(),
        recorder=recorder or MemoryRecorder(),
        local_service="ratings",
        local_version="v1",
        rng=random.Random(3),
        clock=clock or Clock(),
    )
    return build_inbound(service, deps, APP)


def call(handler: Handler, source: str | None = "reviews", method: str = "GET", path: str = "/ratings/1") -> Response:
    async def main() -> Response:
        return await handler(Request(method, path, None, [], FixedBody(b""), service="ratings", source=source))

    return asyncio.run(main())


AUTHZ = Authorization(rules=(Allow(sources=("reviews",), methods=("GET",), paths=("/ratings/*",)),))


def test_enforce_denies_what_no_allow_admits() -> None:
    app = App()
    handler = make(prepared(spec_of(authorization={"ratings": AUTHZ})), app)
    assert call(handler).status == 200
    for source, method, path in [("productpage", "GET", "/ratings/1"), (None, "GET", "/ratings/1"),
                                 ("reviews", "POST", "/ratings/1"), ("reviews", "GET", "/admin")]:
        response = call(handler, source, method, path)
        assert (response.status, response.error) == (403, "denied"), (source, method, path)
    assert app.reached == 1


def test_authorization_agrees_with_the_shared_engine() -> None:
    spec = spec_of(authorization={"ratings": AUTHZ})
    table = DecisionTable.build(spec)
    handler = make(table.service("ratings"), App())
    for source in ("reviews", "productpage", None):
        for method in ("GET", "get", "DELETE"):
            for path in ("/ratings/1", "/ratings", "/other"):
                allowed = table.authorize("ratings", source, method, path).allowed
                assert (call(handler, source, method, path).status == 200) == allowed


def test_audit_allows_and_counts_would_deny() -> None:
    app = App()
    recorder = MemoryRecorder()
    audit = Authorization(rules=AUTHZ.rules, mode="audit")
    handler = make(prepared(spec_of(authorization={"ratings": audit})), app, recorder=recorder)
    assert call(handler, "productpage").status == 200
    assert call(handler, "reviews").status == 200
    assert app.reached == 2
    assert recorder.audit_denials == {("ratings", "productpage"): 1}
    assert 'starmesh_authorization_audit_denials_total{destination_service="ratings",source_service="productpage"} 1' in recorder.render()


def test_rate_limit_counts_exactly_under_concurrency() -> None:
    app = App()
    handler = make(prepared(spec_of(service={"rate_limit": RateLimit(requests_per_second=5, burst=10)})), app)

    async def main() -> list[Response]:
        return await asyncio.gather(
            *(handler(Request("GET", "/", None, [], FixedBody(b""), service="ratings")) for _ in range(25))
        )

    responses = asyncio.run(main())
    assert sum(1 for r in responses if r.status == 200) == 10
    limited = [r for r in responses if r.status == 429]
    assert len(limited) == 15 and all(r.error == "rate-limited" for r in limited)
    assert app.reached == 10


def test_bucket_refills_with_the_clock_and_retry_after_says_when() -> None:
    app = App()
    clock = Clock()
    handler = make(prepared(spec_of(service={"rate_limit": RateLimit(requests_per_second=0.25, burst=2)})), app, clock=clock)
    assert [call(handler).status for _ in range(3)] == [200, 200, 429]
    assert dict(call(handler).headers)["retry-after"] == "4"  # one token every 4 s
    clock.now += 3.0
    response = call(handler)
    assert response.status == 429 and dict(response.headers)["retry-after"] == "1"
    clock.now += 1.0
    assert call(handler).status == 200
    clock.now += 1000.0  # refills only up to burst
    assert [call(handler).status for _ in range(3)] == [200, 200, 429]


def test_retry_after_is_at_least_one_second() -> None:
    clock = Clock()
    handler = make(prepared(spec_of(service={"rate_limit": RateLimit(requests_per_second=1000, burst=1)})), App(), clock=clock)
    assert call(handler).status == 200
    assert dict(call(handler).headers)["retry-after"] == "1"


def test_bucket_survives_a_rebuild_while_the_config_is_unchanged() -> None:
    clock = Clock()
    state = StateRegistry()
    spec = spec_of(service={"rate_limit": RateLimit(requests_per_second=1, burst=2)})
    first = make(prepared(spec), App(), clock=clock, state=state)
    assert [call(first).status for _ in range(2)] == [200, 200]
    again = make(prepared(spec), App(), clock=clock, state=state)
    assert call(again).status == 429
    changed = make(prepared(spec_of(service={"rate_limit": RateLimit(requests_per_second=1, burst=3)})), App(),
                   clock=clock, state=state)
    assert call(changed).status == 200  # a new config starts a new, full bucket


def test_app_failures_map_to_503_with_the_hop_reason() -> None:
    app = App()
    handler = make(None, app)
    app.error = UpstreamError("upstream-unavailable", "connection refused", sent=False)
    assert (call(handler).status, call(handler).error) == (503, "upstream-unavailable")
    app.error = UpstreamError("upstream-reset", "connection reset", sent=True)
    response = call(handler)
    assert (response.status, response.error) == (503, "upstream-reset")
    assert dict(response.headers)["x-starmesh-error"] == "upstream-reset"
    assert set(app.endpoints) == {APP}


def test_inbound_telemetry_labels() -> None:
    recorder = MemoryRecorder()
    handler = make(prepared(spec_of(authorization={"ratings": AUTHZ})), App(), recorder=recorder)
    call(handler, "reviews")
    call(handler, "productpage")
    assert recorder.requests_total(direction="inbound", source_service="reviews", destination_service="ratings",
                                   destination_version="v1", response_code=200, reason="") == 1
    assert recorder.requests_total(source_service="productpage", response_code=403, reason="denied") == 1
    text = recorder.render()
    assert ('starmesh_requests_total{destination_service="ratings",destination_version="v1",direction="inbound",'
            'reason="denied",response_code="403",source_service="productpage"} 1.0') in text
    assert "starmesh_request_duration_seconds_bucket{" in text and 'le="+Inf",reason="denied",' in text


def test_no_authorization_and_no_rate_limit_leave_only_telemetry() -> None:
    service = prepare_service("ratings", Service(), None, None, spec_of())
    app = App()
    handler = make(service, app)
    assert call(handler, None).status == 200
    assert handler.__name__ == "telemetry"
