"""Span export: the SDK's BatchSpanProcessor behind a bound of our own, so dropped spans are counted.

    span.end() ─► BoundedSpanProcessor.on_end: fewer than max_queue_size waiting?
                    yes ─► BatchSpanProcessor (its queue, its worker thread)
                             ─► CountingExporter (handed_over += len(batch)) ─► OTLP/HTTP
                    no  ─► dropped += 1       (starmesh_trace_spans_dropped_total)

The SDK's full queue drops its oldest span and keeps no count anyone can read (its
internal metrics are off unless an environment variable turns them on, and then they
come under the SDK's names), so the bound is ours. Spans waiting are `ended -
handed_over`: `ended` is written only by the thread that ends spans (the event loop),
`handed_over` only under the SDK's export lock, so neither needs a lock of its own. The
difference is never less than what waits in the SDK's queue, so that queue never
overflows; while a batch is between the queue and the exporter it is a little more, and
a span may be refused a moment early (and counted).

Imported by runtime/tracing.py only when spans are exported, like the SDK itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["BoundedSpanProcessor", "CountingExporter"]


class CountingExporter(SpanExporter):
    """An exporter that counts the spans handed to it, then passes them on."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.handed_over = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.handed_over += len(spans)
        return self.exporter.export(spans)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class BoundedSpanProcessor(SpanProcessor):
    """A BatchSpanProcessor to `exporter` that takes at most `max_queue_size` waiting spans and
    counts the ones it refuses (`dropped`)."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int,
        schedule_delay_ms: float,
        meter_provider: Any = None,
    ) -> None:
        self._counting = CountingExporter(exporter)
        self._batch = BatchSpanProcessor(
            self._counting,
            max_queue_size=max_queue_size,
            max_export_batch_size=min(512, max_queue_size),
            schedule_delay_millis=schedule_delay_ms,
            meter_provider=meter_provider,
        )
        self._max = max_queue_size
        self._ended = 0
        self.dropped = 0
        """Spans ended while `max_queue_size` were waiting: never exported."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._ended - self._counting.handed_over >= self._max:
            self.dropped += 1
            return
        self._ended += 1
        self._batch.on_end(span)

    def shutdown(self) -> None:
        self._batch.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._batch.force_flush(timeout_millis)
