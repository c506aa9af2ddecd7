"""W3C trace context on every hop; OpenTelemetry spans only for sampled requests.

Every request through the proxy carries a `traceparent` onward (W3C Trace Context,
version 00): the trace id it came with (or a new one), this hop's own span id and the
sampled flag as decided here. `tracestate` is forwarded unchanged. The decision:

    the caller sent a valid traceparent    its sampled flag decides
    it sent none (or a malformed one)      a new trace, sampled with mesh(tracing(sample_percent))

An unsampled request costs a header scan, a regular-expression check of the incoming
value and a random span id: the OpenTelemetry SDK is never called for it (its spans
cost tens of microseconds; the proxy's latency budget has a few). A sampled request,
when an OTLP endpoint is configured, gets one span per hop from the SDK's
`TracerProvider`: the calling side's proxy a CLIENT span, the receiving side's a
SERVER span, each created with the incoming traceparent as its explicit parent and
explicit start and end times, batched by a `BatchSpanProcessor` with a bounded queue
(spans past it are dropped and counted, `Tracer.dropped`: runtime/tracing_export.py)
and exported over OTLP/HTTP protobuf to `ENDPOINT/v1/traces`. The SDK and the exporter
(protobuf, requests) are imported only then, so a proxy without an endpoint keeps its
idle memory.

    app ─► outbound proxy: CLIENT span (parent: the app's span) ─► inbound proxy: SERVER
           span (parent: that CLIENT span) ─► app ─► outbound proxy: CLIENT span ...
"""

from __future__ import annotations

import random
import re
import time
from typing import TYPE_CHECKING, Any

from starmesh.runtime.message import Headers

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from starmesh.runtime.tracing_export import BoundedSpanProcessor

__all__ = ["TRACEPARENT", "TRACESTATE", "Tracer", "parse_traceparent", "traceparent"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})").fullmatch
_LATER_VERSION = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?").fullmatch
_time_ns = time.time_ns
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

ParsedParent = tuple[str, str, bool]
"""(trace id, parent span id, sampled), ids as lower-case hex."""


def parse_traceparent(value: str) -> ParsedParent | None:
    """The trace id, parent id and sampled flag of a `traceparent` value; None when invalid.

    Version 00 must be exactly 55 characters; a later version may carry more fields
    after a `-` (the spec's forward compatibility); version ff and all-zero ids are
    invalid. Upper-case hex is invalid too (the spec says so)."""
    match = _VERSION_00(value)
    if match is None:
        match = _LATER_VERSION(value)
        if match is None or match.group(1) == "ff" or match.group(1) == "00":
            return None
        trace_id, parent_id, flags = match.group(2, 3, 4)
    else:
        trace_id, parent_id, flags = match.groups()
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, (int(flags, 16) & 1) == 1


def _header(headers: Headers, name: str) -> str | None:
    for field, value in headers:
        if field == name:
            return value
    return None


def traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    """A version-00 `traceparent` value."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


class _Sdk:
    """The OpenTelemetry API names a span needs, imported once (when exporting starts)."""

    def __init__(self) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.span import TraceState

        self.Context = Context
        self.NonRecordingSpan = NonRecordingSpan
        self.SpanContext = SpanContext
        self.TraceState = TraceState
        self.set_span_in_context = set_span_in_context
        self.SAMPLED = TraceFlags(TraceFlags.SAMPLED)
        self.SERVER = SpanKind.SERVER
        self.CLIENT = SpanKind.CLIENT
        self.ERROR = Status(StatusCode.ERROR)


class Tracer:
    """The proxy's tracing: ids and sampling always, SDK spans only when exporting.

    `endpoint` is the OTLP/HTTP base URL (`--otlp-endpoint`); spans go to
    `ENDPOINT/v1/traces`. `exporter` replaces the OTLP exporter (tests: an in-memory
    one). Without either, `exporting` is False and the SDK is never imported.
    `max_queue_size` bounds the spans waiting for export; `dropped` counts the ones
    refused. `meter_provider` receives the batch processor's own metrics, when given."""

    def __init__(
        self,
        service: str,
        version: str = "",
        *,
        endpoint: str | None = None,
        exporter: SpanExporter | None = None,
        max_queue_size: int = 2048,
        schedule_delay_ms: float = 1000.0,
        rng: random.Random | None = None,
        meter_provider: Any = None,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        ids = rng if rng is not None else random.Random()
        self._bits = ids.getrandbits
        self.random = ids.random
        """A float in [0, 1): the sampling roll."""
        self._provider: Any = None
        self._tracer: Any = None
        self._sdk: Any = None
        self._processor: BoundedSpanProcessor | None = None
        if exporter is None and endpoint is not None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5)
        self.exporting = exporter is not None
        if exporter is not None:
            self._start_sdk(exporter, version, max_queue_size, schedule_delay_ms, meter_provider)

    def _start_sdk(
        self, exporter: SpanExporter, version: str, max_queue_size: int, schedule_delay_ms: float, meter_provider: Any
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        from starmesh.runtime.tracing_export import BoundedSpanProcessor

        attributes = {"service.name": self.service}
        if version:
            attributes["service.version"] = version
        # We sample before calling the SDK, so every span it sees is kept (ALWAYS_ON).
        provider = TracerProvider(resource=Resource.create(attributes), sampler=ALWAYS_ON)
        self._processor = BoundedSpanProcessor(
            exporter, max_queue_size=max_queue_size, schedule_delay_ms=schedule_delay_ms, meter_provider=meter_provider
        )
        provider.add_span_processor(self._processor)
        self._provider = provider
        self._tracer = provider.get_tracer("starmesh.proxy")
        self._sdk = _Sdk()

    # -- every request -----------------------------------------------------------------

    def propagate(self, headers: Headers, percent: float, server: bool, name: str) -> tuple[str, Span | None]:
        """Decide sampling and send this hop's traceparent onward in `headers` (rewritten
        in place): (the trace id, this hop's span or None).

        The span exists only when the request is sampled and this tracer exports; it is
        SERVER when `server`, else CLIENT, and named `name` (the method). Without
        exporting, a valid incoming traceparent is forwarded unchanged (this hop has no
        span, so the next one's parent stays the caller's)."""
        index = 0
        for field, _ in headers:
            if field == TRACEPARENT:
                break
            index += 1
        else:
            index = -1
        parent = parse_traceparent(headers[index][1]) if index >= 0 else None
        span = None
        if parent is not None:
            trace_id, _, sampled = parent
            if not self.exporting:
                return trace_id, None
        else:
            trace_id = ""
            sampled = percent > 0.0 and self.random() * 100.0 < percent
        if sampled and self.exporting:
            span = self.start_span(name, server, parent, _header(headers, TRACESTATE), _time_ns())
            trace_id, span_id = self.span_ids(span)
        else:
            trace_id = trace_id or self.new_trace_id()
            span_id = self.new_span_id()
        value = (TRACEPARENT, traceparent(trace_id, span_id, sampled))
        if index >= 0:
            headers[index] = value
        else:
            headers.append(value)
        return trace_id, span

    # -- ids -------------------------------------------------------------------------

    def new_trace_id(self) -> str:
        """32 hex digits, never all zero."""
        return "%032x" % (self._bits(128) or 1)

    def new_span_id(self) -> str:
        """16 hex digits, never all zero."""
        return "%016x" % (self._bits(64) or 1)

    # -- spans (sampled requests only, when exporting) ---------------------------------

    def start_span(
        self, name: str, server: bool, parent: ParsedParent | None, tracestate: str | None, start_ns: int
    ) -> Span:
        """A span for this hop (SERVER when `server`, else CLIENT) under `parent`
        (None: a new trace), starting at `start_ns` (ns since the epoch)."""
        sdk = self._sdk
        if parent is None:
            context = sdk.Context()  # explicitly no parent (never the ambient context)
        else:
            trace_id, parent_id, _ = parent
            state = sdk.TraceState.from_header([tracestate]) if tracestate else None
            remote = sdk.SpanContext(int(trace_id, 16), int(parent_id, 16), True, sdk.SAMPLED, state)
            context = sdk.set_span_in_context(sdk.NonRecordingSpan(remote))
        kind = sdk.SERVER if server else sdk.CLIENT
        span: Span = self._tracer.start_span(
            name, context, kind, start_time=start_ns, record_exception=False, set_status_on_exception=False
        )
        return span

    @staticmethod
    def span_ids(span: Span) -> tuple[str, str]:
        """The span's (trace id, span id) as hex, for the traceparent sent onward."""
        context = span.get_span_context()
        return "%032x" % context.trace_id, "%016x" % context.span_id

    def end_span(self, span: Span, attributes: dict[str, str | int], error: str | None, end_ns: int) -> None:
        """Set the span's attributes (and error status, with `error.type`), end it at `end_ns`."""
        if error is not None:
            attributes["error.type"] = error
            span.set_status(self._sdk.ERROR)
        span.set_attributes(attributes)
        span.end(end_time=end_ns)

    @property
    def dropped(self) -> int:
        """Sampled spans not exported because the export queue was full (0 when not exporting)."""
        return 0 if self._processor is None else self._processor.dropped

    def flush(self, timeout_ms: int = 10_000) -> bool:
        """Export every span ended so far (blocking); False when not exporting."""
        return bool(self._provider.force_flush(timeout_ms)) if self._provider is not None else False

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop the SDK's thread."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
