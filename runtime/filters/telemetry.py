"""Telemetry: count and time every request, trace it and log it; outermost in both chains.

The duration runs to the response head (when the chain returns the Response), which is
what the chain can see without wrapping the body. `reason` is the response's
`x-starmesh-error` word when the proxy made it, "" otherwise.

With an `Observe` (the proxy's tracer and access log), each request also:

    before   finds `traceparent`, decides sampling (runtime/tracing.py) and sends this
             hop's traceparent onward (a request header, rewritten in place)
    after    ends this hop's span (sampled requests, when exporting) with the HTTP
             semantic-convention attributes and starmesh's own (route, decision,
             destination version, proven source); offers an access-log line to the
             token bucket and, when admitted, queues it (runtime/access_log.py)

Per request, nothing is built that is not needed: no SDK call unless sampled and
exporting, no log line unless the bucket admits it. The mesh settings (sample_percent,
access_log) are those of the bundle the chain was built for (`Observe.mesh`), read once,
when the chain is built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from starmesh.bundle.authz import PreparedAuthorization
from starmesh.bundle.spec import MeshConfig
from starmesh.runtime.access_log import MAX_FIELD, AccessEntry, AccessLog
from starmesh.runtime.message import Filter, Handler, Request, Response
from starmesh.runtime.telemetry import Recorder, RouteRecord
from starmesh.runtime.tracing import TRACEPARENT, Tracer, parse_traceparent

__all__ = ["Observe", "telemetry_filter"]

_time_ns = time.time_ns
_wall = time.time


@dataclass(frozen=True)
class Observe:
    """Traces and access logs for one chain, built once per route.

    `mesh` is the `mesh(...)` of the bundle the chain is built for (its tracing and
    access_log settings; None: the defaults). `route` names the matched rule for spans
    and lines ("route/reviews/0 mesh.star:12"); `authorization` (inbound) lets a logged
    line say `would_deny` under audit mode."""

    tracer: Tracer | None
    access_log: AccessLog | None
    mesh: MeshConfig | None = None
    route: str = ""
    authorization: PreparedAuthorization | None = None


def telemetry_filter(
    recorder: Recorder,
    clock: Callable[[], float],
    *,
    direction: str,
    source: str | None,
    destination: str,
    version: str | None,
    observe: Observe | None = None,
) -> Filter:
    """Record each request under fixed labels; trace and log it when `observe` says how.

    `source` None takes the request's proven identity (inbound); `version` None takes
    the version the split picked, `request.target_version` (outbound)."""
    if observe is not None and (observe.tracer is not None or observe.access_log is not None):
        return _observed(recorder, clock, direction, source, destination, version, observe)
    record = recorder.request
    if source is not None:
        return _fixed_source(recorder.bind(direction, source, destination), clock, version)

    # The source varies per request (inbound: the caller's proven identity).
    def wrap(inner: Handler) -> Handler:
        async def telemetry(request: Request) -> Response:
            start = clock()
            try:
                response = await inner(request)
            except Exception:
                picked = (request.target_version or "") if version is None else version  # set by the split, inside
                record(direction, request.source or "", destination, picked, 500, "", clock() - start)
                raise
            picked = (request.target_version or "") if version is None else version
            record(direction, request.source or "", destination, picked, response.status, response.error, clock() - start)
            return response

        return telemetry

    return wrap


def _fixed_source(record: RouteRecord, clock: Callable[[], float], version: str | None) -> Filter:
    """The telemetry filter when the source is fixed (outbound): a per-route bound recorder."""

    def wrap(inner: Handler) -> Handler:
        async def telemetry(request: Request) -> Response:
            start = clock()
            try:
                response = await inner(request)
            except Exception:
                record((request.target_version or "") if version is None else version, 500, "", clock() - start)
                raise
            record(
                (request.target_version or "") if version is None else version,
                response.status,
                response.error,
                clock() - start,
            )
            return response

        return telemetry

    return wrap


def _observed(
    recorder: Recorder,
    clock: Callable[[], float],
    direction: str,
    source: str | None,
    destination: str,
    version: str | None,
    observe: Observe,
) -> Filter:
    """The telemetry filter with traces and access logs (see the module docstring)."""
    fixed = recorder.bind(direction, source, destination) if source is not None else None
    record = recorder.request
    tracer = observe.tracer
    mesh = observe.mesh if observe.mesh is not None else MeshConfig(name="")  # None: the defaults
    percent = float(mesh.tracing.sample_percent)
    rate = mesh.access_log.max_lines_per_second
    access = observe.access_log if mesh.access_log.enabled else None
    hop = _Hop(direction, source, destination, observe)
    server = hop.server

    def wrap(inner: Handler) -> Handler:
        async def telemetry(request: Request) -> Response:
            start = clock()
            trace_id: str | None = None
            span = None
            if tracer is not None:
                trace_id, span = tracer.propagate(request.headers, percent, server, request.method)
            try:
                response = await inner(request)
            except BaseException as exc:
                seconds = clock() - start
                picked = (request.target_version or "") if version is None else version
                # 0: a cancelled request (the client left), no answer: not counted (Envoy logs 0 too).
                status = 500 if isinstance(exc, Exception) else 0
                if status:
                    if fixed is not None:
                        fixed(picked, 500, "", seconds)
                    else:
                        record(direction, request.source or "", destination, picked, 500, "", seconds)
                if span is not None:
                    assert tracer is not None
                    attributes = hop.attributes(request, None, status, picked)
                    tracer.end_span(span, attributes, type(exc).__name__, _time_ns())
                if access is not None and access.admit(start + seconds, rate):
                    access.put(hop.entry(request, None, status, picked, seconds, trace_id))
                raise
            seconds = clock() - start
            picked = (request.target_version or "") if version is None else version
            if fixed is not None:
                fixed(picked, response.status, response.error, seconds)
            else:
                record(direction, request.source or "", destination, picked, response.status, response.error, seconds)
            if span is not None:
                assert tracer is not None
                attributes = hop.attributes(request, response, response.status, picked)
                tracer.end_span(span, attributes, hop.error(response), _time_ns())
            if access is not None and access.admit(start + seconds, rate):
                access.put(hop.entry(request, response, response.status, picked, seconds, trace_id))
            return response

        return telemetry

    return wrap


class _Hop:
    """What one chain's spans and log lines say beyond the request itself (built once)."""

    def __init__(self, direction: str, source: str | None, destination: str, observe: Observe) -> None:
        self.direction = direction
        self.server = direction == "inbound"
        self.source = source
        self.destination = destination
        self.route = observe.route
        self.authorization = observe.authorization

    def error(self, response: Response) -> str | None:
        """`error.type` per the HTTP conventions: the proxy's reason, else the status when it is an error."""
        if response.error:
            return response.error
        if response.status >= 500 or (not self.server and response.status >= 400):
            return str(response.status)
        return None

    def attributes(
        self, request: Request, response: Response | None, status: int, version: str
    ) -> dict[str, str | int]:
        """A span's attributes: HTTP semantic conventions, then starmesh's own.

        `response` None: the chain raised (`status` 500) or was cancelled (0: no status)."""
        found: dict[str, str | int] = {
            "http.request.method": request.method,
            "url.path": request.path[:MAX_FIELD],
            "url.scheme": "http",
            "network.protocol.name": "http",
            "network.protocol.version": request.version,
            "starmesh.decision": (response.error or "forwarded") if response is not None else "error",
            "starmesh.destination.service": self.destination,
        }
        if status:
            found["http.response.status_code"] = status
        host, _, port = request.authority.rpartition(":")
        if not host or not port.isdigit():
            host, port = request.authority, ""
        if host:
            found["server.address"] = host
        if port:
            found["server.port"] = int(port)
        if self.server:
            if request.client:
                found["client.address"] = request.client
                found["network.peer.address"] = request.client
        elif response is not None and response.endpoint:
            peer, _, peer_port = response.endpoint.rpartition(":")
            found["network.peer.address"] = peer.strip("[]")
            if peer_port.isdigit():
                found["network.peer.port"] = int(peer_port)
        if self.route:
            found["starmesh.route"] = self.route
        if version:
            found["starmesh.destination.version"] = version
        who = request.source if self.server else self.source
        if who:
            found["starmesh.source"] = who
        agent = request.header("user-agent")
        if agent:
            found["user_agent.original"] = agent[:MAX_FIELD]
        return found

    def entry(
        self,
        request: Request,
        response: Response | None,
        status: int,
        version: str,
        seconds: float,
        trace_id: str | None,
    ) -> AccessEntry:
        """The access-log line's values (formatted by the writer thread)."""
        if trace_id is None:  # no tracer: the trace the request came with, if any
            incoming = request.header(TRACEPARENT)
            parsed = parse_traceparent(incoming) if incoming is not None else None
            trace_id = parsed[0] if parsed is not None else None
        would_deny = False
        if self.authorization is not None and self.authorization.mode == "audit":
            would_deny = self.authorization.decide(request.source, request.method.upper(), request.path).would_deny
        return AccessEntry(
            _wall() - seconds,
            self.direction,
            request.method,
            request.path,
            f"HTTP/{request.version}",
            status,
            response.error if response is not None else "",
            self.destination,
            response.endpoint if response is not None else "",
            version,
            self.route,
            seconds,
            request.body.length,
            response.body.length if response is not None else None,
            trace_id,
            request.source if self.server else self.source,
            request.header("x-request-id"),
            request.authority,
            request.header("user-agent"),
            would_deny,
        )
