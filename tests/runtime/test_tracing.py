"""Trace context on every hop (runtime/tracing.py) and spans from the telemetry filter.

Spans go to the SDK's in-memory exporter through the real TracerProvider and
BatchSpanProcessor; the chains are the ones RouteTable builds (build_outbound,
build_inbound) in front of a pool that records what it was sent.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from starmesh.bundle.canonical import decode_bundle, digest_of
from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import MeshConfig, Rule, Service, SourceLocation, Spec, Tracing
from starmesh.runtime.chain import ChainDeps, build_inbound, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.message import FixedBody, Headers, Request, Response, proxy_response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.table import RouteTable
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.tracing import Tracer, parse_traceparent, traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""


# -- parsing -------------------------------------------------------------------------------------


def test_a_valid_traceparent_is_parsed() -> None:
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-01") == (TRACE, PARENT, True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, False)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03") == (TRACE, PARENT, True)  # other flag bits ignored


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex is invalid
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # version ff
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 is exactly 55 characters
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00_{TRACE}-{PARENT}-01",
        f" 00-{TRACE}-{PARENT}-01",
    ],
)
def test_an_invalid_traceparent_is_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_may_carry_more_fields() -> None:
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01-what-comes-later") == (TRACE, PARENT, True)
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-00") == (TRACE, PARENT, False)


# -- propagation without the SDK ---------------------------------------------------------------


def test_without_a_traceparent_a_new_trace_starts_sampled_per_percent() -> None:
    tracer = Tracer("web", rng=random.Random(1))
    for percent, flag in ((0.0, "00"), (100.0, "01")):
        headers: Headers = [("host", "api")]
        trace_id, span = tracer.propagate(headers, percent, False, "GET")
        assert span is None
        sent = dict(headers)["traceparent"]
        parsed = parse_traceparent(sent)
        assert parsed is not None and parsed[0] == trace_id and sent.endswith(f"-{flag}")


def test_sampling_follows_the_percent_without_a_caller_decision() -> None:
    tracer = Tracer("web", rng=random.Random(7))
    sampled = 0
    for _ in range(2000):
        headers: Headers = []
        tracer.propagate(headers, 25.0, False, "GET")
        sampled += headers[0][1].endswith("-01")
    assert 400 < sampled < 600  # 500 expected; ±4.5 sigma is ±87


def test_a_tracer_that_does_not_export_forwards_a_valid_traceparent_unchanged() -> None:
    tracer = Tracer("web")
    value = f"00-{TRACE}-{PARENT}-01"
    headers: Headers = [("host", "api"), ("traceparent", value)]
    assert tracer.propagate(headers, 0.0, False, "GET") == (TRACE, None)
    assert headers == [("host", "api"), ("traceparent", value)]


def test_a_malformed_traceparent_is_replaced_by_a_new_trace() -> None:
    tracer = Tracer("web")
    headers: Headers = [("traceparent", "junk"), ("tracestate", "a=b")]
    trace_id, _ = tracer.propagate(headers, 0.0, False, "GET")
    assert headers[0] == ("traceparent", traceparent(trace_id, headers[0][1][36:52], False))
    assert headers[1] == ("tracestate", "a=b")
    assert len(headers) == 2


def test_an_unsampled_request_never_calls_the_sdk() -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer("web", exporter=exporter)

    def refuse(*args: Any) -> Any:
        raise AssertionError("the SDK was called for an unsampled request")

    tracer.start_span = refuse  # type: ignore[method-assign]
    try:
        incoming = f"00-{TRACE}-{PARENT}-00"
        headers: Headers = [("traceparent", incoming)]
        trace_id, span = tracer.propagate(headers, 100.0, False, "GET")  # the caller's flag wins over 100%
        assert (trace_id, span) == (TRACE, None)
        sent = parse_traceparent(headers[0][1])
        assert sent is not None and sent[0] == TRACE and sent[1] != PARENT and not sent[2]  # this hop's own id
        fresh: Headers = []
        tracer.propagate(fresh, 0.0, False, "GET")
        assert fresh[0][1].endswith("-00")
    finally:
        tracer.shutdown()
    assert exporter.get_finished_spans() == ()


class HeldExporter(InMemorySpanExporter):
    """An exporter that holds every export until `held` is set (a collector that stalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.held.wait(DEADLINE)
        return super().export(spans)


def test_spans_past_the_export_queue_are_dropped_and_counted() -> None:
    exporter = HeldExporter()
    tracer = Tracer("web", exporter=exporter, max_queue_size=4, schedule_delay_ms=5)
    try:
        for _ in range(20):
            tracer.end_span(tracer.start_span("GET", False, None, None, time.time_ns()), {}, None, time.time_ns())
        dropped = tracer.dropped
        exporter.held.set()
        assert tracer.flush()
        exported = len(exporter.get_finished_spans())
    finally:
        exporter.held.set()
        tracer.shutdown()
    # At most a queue's worth waits and one batch is held in the exporter; the rest is refused.
    assert dropped >= 20 - 2 * 4
    assert exported + dropped == 20  # every span exported or counted, none lost silently
    assert Tracer("web").dropped == 0  # not exporting: nothing to drop


# -- spans from the chains -------------------------------------------------------------------------


class RecordingPool:
    """Answers 200 from the endpoint it was asked for and keeps the headers each request carried."""

    def __init__(self, status: int = 200) -> None:
        self.sent: list[Headers] = []
        self.status = status

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        self.sent.append(list(request.headers))
        return Response(self.status, [], FixedBody(b"hello"), endpoint=endpoint)

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


def prepared(
    name: str = "api", rule: Rule | None = None, where: dict[str, SourceLocation] | None = None
) -> PreparedService:
    service = Service(versions=("v1",))
    routes: dict[str, tuple[Rule, ...]] = {name: (rule,)} if rule is not None else {}
    spec = Spec(mesh=MeshConfig(name="m"), services={name: service}, routes=routes, source_map=where or {})
    return prepare_service(name, service, (rule,) if rule is not None else None, None, spec)


def deps_with(tracer: Tracer, pool: RecordingPool, *, percent: float = 100.0, **kw: Any) -> ChainDeps:
    mesh = MeshConfig(name="m", tracing=Tracing(sample_percent=percent))
    return ChainDeps(
        pool=pool,
        endpoints=Endpoints({"api": {"v1": ("127.0.0.1:7001",)}}),
        state=StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="web",
        local_version="v1",
        tracer=tracer,
        mesh=kw.pop("mesh", mesh),
        **kw,
    )


def call(handler: Any, headers: Headers, *, source: str | None = None) -> Response:
    request = Request("GET", "/items/1", "q=2", headers, FixedBody(b""), "api", "api:8080", "127.0.0.9", source)
    response: Response = asyncio.run(handler(request))
    return response


def finished(exporter: InMemorySpanExporter, tracer: Tracer) -> list[ReadableSpan]:
    assert tracer.flush()
    return list(exporter.get_finished_spans())


def test_a_sampled_outbound_request_gets_a_client_span_under_the_callers_span() -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer("web", "v1", exporter=exporter)
    pool = RecordingPool()
    service = prepared(rule=Rule(), where={"route/api/0": SourceLocation(file="mesh.star", line=12, col=1)})
    try:
        handler = build_outbound(service, service.rules[0], deps_with(tracer, pool, percent=0.0))
        response = call(handler, [("host", "api:8080"), ("traceparent", f"00-{TRACE}-{PARENT}-01"),
                                  ("tracestate", "vendor=x"), ("user-agent", "test/1")])
        assert response.status == 200
        (span,) = finished(exporter, tracer)
    finally:
        tracer.shutdown()
    assert span.kind is SpanKind.CLIENT
    assert span.name == "GET"
    context, parent = span.context, span.parent
    assert context is not None and parent is not None
    assert "%032x" % context.trace_id == TRACE and "%016x" % parent.span_id == PARENT and parent.is_remote
    assert context.trace_state.get("vendor") == "x"
    # What went upstream names this span as the parent; tracestate went on unchanged.
    sent = dict(pool.sent[0])
    assert sent["traceparent"] == traceparent(TRACE, "%016x" % context.span_id, True)
    assert sent["tracestate"] == "vendor=x"
    assert span.start_time is not None and span.end_time is not None and span.start_time <= span.end_time
    attributes = dict(span.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/items/1"
    assert attributes["http.response.status_code"] == 200
    assert attributes["server.address"] == "api" and attributes["server.port"] == 8080
    assert attributes["network.peer.address"] == "127.0.0.1" and attributes["network.peer.port"] == 7001
    assert attributes["starmesh.route"] == "route/api/0 mesh.star:12"
    assert attributes["starmesh.decision"] == "forwarded"
    assert attributes["starmesh.source"] == "web"
    assert attributes["user_agent.original"] == "test/1"
    assert span.resource.attributes["service.name"] == "web"
    assert span.status.status_code is StatusCode.UNSET


def test_sampling_percent_comes_from_the_mesh_when_the_caller_did_not_decide() -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer("web", exporter=exporter)
    service = prepared()
    try:
        for percent in (0.0, 100.0):
            pool = RecordingPool()
            handler = build_outbound(service, service.rules[0], deps_with(tracer, pool, percent=percent))
            call(handler, [("host", "api")])
            sent = parse_traceparent(dict(pool.sent[0])["traceparent"])
            assert sent is not None and sent[2] is (percent == 100.0)
        (span,) = finished(exporter, tracer)  # only the sampled one, a new trace's root
    finally:
        tracer.shutdown()
    assert span.parent is None


SAMPLED_POLICY = """
mesh(name = "t", mtls = "disable", tracing = tracing(sample_percent = {percent}))
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1"])
"""


def test_each_tables_chains_sample_per_the_bundle_they_were_built_from(tmp_path: Path, rt: Any) -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer("web", exporter=exporter)
    pool = RecordingPool()
    deps = deps_with(tracer, pool, mesh=None)  # RouteTable.build gives each table its bundle's mesh
    tables = {}
    for percent in (0, 100):
        data = rt.compile_policy(tmp_path / f"p{percent}", SAMPLED_POLICY.format(percent=percent))
        tables[percent] = RouteTable.build(decode_bundle(data), digest_of(data), deps, app="127.0.0.1:9")

    async def requests() -> None:
        for percent in (100, 0, 100, 0):  # the old table keeps its settings while the new one is live
            request = Request("GET", "/", None, [("host", "api")], FixedBody(b""), "api", "api")
            await tables[percent].outbound(request)

    try:
        asyncio.run(requests())
        spans = finished(exporter, tracer)
    finally:
        tracer.shutdown()
    assert len(spans) == 2
    sampled = [parse_traceparent(dict(sent)["traceparent"]) for sent in pool.sent]
    assert [parent is not None and parent[2] for parent in sampled] == [True, False, True, False]


def test_an_inbound_request_gets_a_server_span_with_the_proven_source() -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer("api", "v1", exporter=exporter)
    pool = RecordingPool(status=503)
    try:
        handler = build_inbound(prepared(), deps_with(tracer, pool), "127.0.0.1:9080")
        call(handler, [("host", "api"), ("traceparent", f"00-{TRACE}-{PARENT}-01")], source="web")
        (span,) = finished(exporter, tracer)
    finally:
        tracer.shutdown()
    assert span.kind is SpanKind.SERVER
    assert span.parent is not None and "%016x" % span.parent.span_id == PARENT
    attributes = dict(span.attributes or {})
    assert attributes["starmesh.source"] == "web"
    assert attributes["starmesh.destination.version"] == "v1"
    assert attributes["client.address"] == "127.0.0.9"
    assert attributes["http.response.status_code"] == 503
    assert attributes["error.type"] == "503"
    assert span.status.status_code is StatusCode.ERROR
    assert dict(pool.sent[0])["traceparent"] == traceparent(TRACE, "%016x" % span.context.span_id, True)


def test_a_response_the_proxy_made_names_its_reason() -> None:
    exporter = InMemorySpanExporter()
    tracer = Tracer("api", exporter=exporter)

    class Denying(RecordingPool):
        async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
            return proxy_response(503, "upstream-unavailable", "refused")

    try:
        handler = build_inbound(prepared(), deps_with(tracer, Denying()), "127.0.0.1:9080")
        call(handler, [("host", "api"), ("traceparent", f"00-{TRACE}-{PARENT}-01")])
        (span,) = finished(exporter, tracer)
    finally:
        tracer.shutdown()
    attributes = dict(span.attributes or {})
    assert attributes["starmesh.decision"] == "upstream-unavailable"
    assert attributes["error.type"] == "upstream-unavailable"


def test_without_a_tracer_the_chain_leaves_headers_alone() -> None:
    pool = RecordingPool()
    deps = ChainDeps(
        pool=pool,
        endpoints=Endpoints({"api": {"v1": ("127.0.0.1:7001",)}}),
        state=StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="web",
    )
    service = prepared()
    call(build_outbound(service, service.rules[0], deps), [("host", "api")])
    assert pool.sent == [[("host", "api")]]

