"""End to end: one trace through three services, each behind a real `starmesh proxy`.

    test ─► front's inbound proxy ─► front app ─► front's outbound proxy
         ─► middle's inbound proxy ─► middle app ─► middle's outbound proxy
         ─► back's inbound proxy ─► back app (answers with the traceparent it received)

The apps forward `traceparent` and `tracestate` as an instrumented app would (without
spans of their own). Every proxy exports to a small OTLP/HTTP receiver in this process
(an aiohttp app decoding `ExportTraceServiceRequest` with opentelemetry-proto), so the
test sees what a collector would: five spans per sampled request, in one trace, each
the child of the one before.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

pytestmark = pytest.mark.slow

DEADLINE = 30.0
"""Seconds to wait for spans to arrive; a bound on waiting, never an assertion about speed."""

POLICY = """
mesh(name = "traced", mtls = "disable", tracing = tracing(sample_percent = {percent}))
service(name = "front")
service(name = "middle")
service(name = "back")
"""

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Received:
    """One span as the receiver decoded it."""

    service: str
    kind: str  # SERVER | CLIENT
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


def _value(any_value: Any) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind is not None else None


class Stage:
    """The receiver and the three apps, on one event loop in a background thread (`apps`,
    an `rt.BackgroundApps`)."""

    def __init__(self, apps: Any) -> None:
        self.apps = apps
        self.spans: list[Received] = []
        self.lock = threading.Lock()
        self.outbound: dict[str, str] = {}  # app name -> its proxy's outbound address
        self.session: aiohttp.ClientSession | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        found = []
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Received(
                            service=str(resource.get("service.name")),
                            kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self.lock:
            self.spans.extend(found)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def receiver(self) -> str:
        async def metrics(request: web.Request) -> web.Response:  # the proxies push metrics too: taken, unread
            await request.read()
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", metrics)
        address: str = self.apps.serve(app)
        return "http://" + address

    def app(self, name: str, calls: str | None) -> str:
        """An app that calls `calls` through its proxy's outbound listener, forwarding the
        trace headers, or (`calls` None) answers with the traceparent it received."""

        async def handle(request: web.Request) -> web.Response:
            if calls is None:
                return web.json_response({"traceparent": request.headers.get("traceparent")})
            forwarded = {k: v for k, v in request.headers.items() if k.lower() in ("traceparent", "tracestate")}
            if self.session is None:
                self.session = aiohttp.ClientSession()
            url = f"http://{self.outbound[name]}{request.path}"
            async with self.session.get(url, headers={"Host": calls, **forwarded}) as answer:
                return web.Response(body=await answer.read(), status=answer.status, content_type="application/json")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        address: str = self.apps.serve(app)
        return address

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        """Close the apps' client session, then the apps and their loop."""
        try:
            if self.session is not None:
                self.apps.run(self.session.close())
        finally:
            self.apps.close()


@pytest.fixture
def stage(rt: Any) -> Iterator[Stage]:
    started = Stage(rt.BackgroundApps())
    try:
        yield started
    finally:
        started.close()


def _three_hops(mesh: Any, stage: Stage, percent: int) -> Any:
    """Start the receiver, the apps and their proxies (back first: each needs the next's
    inbound address); the front proxy."""
    otlp = stage.receiver()
    bundle = mesh.bundle(POLICY.format(percent=percent))
    apps = {"front": stage.app("front", "middle"), "middle": stage.app("middle", "back"), "back": stage.app("back", None)}
    proxies: dict[str, Any] = {}
    for name, calls in (("back", None), ("middle", "back"), ("front", "middle")):
        endpoints = mesh.endpoints({calls: {"v1": [proxies[calls].inbound]}}) if calls else None
        proxies[name] = mesh.proxy(name, bundle, endpoints, app=apps[name], extra=["--otlp-endpoint", otlp])
        stage.outbound[name] = proxies[name].outbound
    return proxies


def _wait_for(stage: Stage, trace_id: str, count: int) -> list[Received]:
    """The spans of `trace_id` once `count` have arrived (or what has, after DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        spans = [s for s in stage.received() if s.trace_id == trace_id]
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)


def test_a_sampled_request_is_one_trace_across_three_hops(mesh: Any, stage: Stage, h: Any) -> None:
    proxies = _three_hops(mesh, stage, percent=0)  # the caller's sampled flag decides

    sampled = h.call(proxies["front"].inbound, "/books/1", host="front",
                     headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=1"})
    other = "0af7651916cd43dd8448eb211c80319c"
    unsampled = h.call(proxies["front"].inbound, "/books/2", host="front",
                       headers={"traceparent": f"00-{other}-{CLIENT_SPAN}-00"})
    assert (sampled.status, unsampled.status) == (200, 200)

    _wait_for(stage, TRACE, 5)
    for proxy in proxies.values():  # a stopped proxy has exported everything it had
        assert proxy.stop() == 0
    spans = [s for s in stage.received() if s.trace_id == TRACE]
    by_hop = {(s.service, s.kind): s for s in spans}
    assert sorted(by_hop) == sorted(
        [("front", "SERVER"), ("front", "CLIENT"), ("middle", "SERVER"), ("middle", "CLIENT"), ("back", "SERVER")]
    ), spans
    assert len(spans) == 5

    # Parent links: the test's span → front in → front out → middle in → middle out → back in.
    chain = [by_hop[hop] for hop in (("front", "SERVER"), ("front", "CLIENT"), ("middle", "SERVER"),
                                     ("middle", "CLIENT"), ("back", "SERVER"))]
    assert chain[0].parent_id == CLIENT_SPAN
    for parent, child in zip(chain, chain[1:], strict=False):
        assert child.parent_id == parent.span_id, (parent, child)
    # The back app got the last span as its parent, sampled, with tracestate untouched.
    assert sampled.json() == {"traceparent": f"00-{TRACE}-{chain[-1].span_id}-01"}

    for span in spans:
        attributes = span.attributes
        assert attributes["http.request.method"] == "GET"
        assert attributes["url.path"] == "/books/1"
        assert attributes["http.response.status_code"] == 200
        assert attributes["starmesh.decision"] == "forwarded"
    assert chain[1].attributes["starmesh.route"] == "service/middle"
    assert chain[1].attributes["starmesh.source"] == "front"
    assert chain[1].attributes["server.address"] == "middle"
    assert chain[1].attributes["network.peer.address"] == "127.0.0.1"
    assert chain[3].attributes["starmesh.destination.service"] == "back"

    # The unsampled request left no span anywhere, yet its trace went through every hop.
    assert [s for s in stage.received() if s.trace_id == other] == []
    seen = unsampled.json()["traceparent"]
    assert seen.startswith(f"00-{other}-") and seen.endswith("-00") and CLIENT_SPAN not in seen


def test_without_a_caller_decision_the_mesh_samples(mesh: Any, stage: Stage, h: Any) -> None:
    proxies = _three_hops(mesh, stage, percent=100)

    reply = h.call(proxies["front"].inbound, "/start", host="front")
    assert reply.status == 200
    trace_id = reply.json()["traceparent"].split("-")[1]

    spans = _wait_for(stage, trace_id, 5)
    assert len(spans) == 5
    roots = [s for s in spans if s.parent_id == ""]
    assert [(r.service, r.kind) for r in roots] == [("front", "SERVER")]  # a new trace starts at the first hop
