"""The proxy's metrics in OpenTelemetry: Prometheus text for admin /metrics, OTLP when asked.

    MemoryRecorder (telemetry.py: integer adds per request, nothing else)
        │ read at collection time, never per request: recorder_metrics() ─► cumulative Sum / Histogram
        ▼
    MeterProvider ─ observable instruments for the proxy's state (otel_gauges.py)
        ├─ _PrometheusReader: the SDK's PrometheusMetricReader, our metrics appended
        │      ─► prometheus_client.generate_latest(private registry) ─► GET /metrics
        └─ _PushingReader: the SDK's PeriodicExportingMetricReader, our metrics appended
               ─► OTLPMetricExporter ─► POST URL/v1/metrics            (only with --otlp-endpoint)
                  every $OTEL_METRIC_EXPORT_INTERVAL ms (60 s)

The OpenTelemetry SDK's synchronous instruments cost microseconds per call, too much
for the proxy's latency budget, so requests are counted by the recorder and only
converted here. Rendering and encoding are OpenTelemetry's and prometheus_client's:
nothing here writes exposition text. The OTLP exporter (protobuf, requests) is
imported only when an endpoint is configured, to keep the idle proxy small.

Every series is cumulative from the proxy's start. A Prometheus registry per
`ProxyMetrics` keeps proxies in one test process apart; `target_info` and the
`otel_scope_*` labels are left out (the scope is always this one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, generate_latest

from starmesh.runtime.telemetry import DURATION_BUCKETS, MemoryRecorder, ServiceCounter

__all__ = ["SCOPE", "ProxyMetrics", "otlp_exporter", "recorder_metrics", "recorder_text"]

SCOPE = InstrumentationScope("starmesh.proxy")
"""The instrumentation scope of every proxy metric (the meter's name too)."""

_CUMULATIVE = AggregationTemporality.CUMULATIVE
_UNSET = cast(float, None)
"""A histogram's min/max: the recorder does not track them (two compares per request for a
number nobody plots); OTLP's fields are optional and the encoder leaves None unset."""

_SERVICE_COUNTERS: dict[ServiceCounter, tuple[str, str, Mapping[str, str]]] = {
    "retries": ("starmesh_retries_total", "Retries made (tries after the first).", {}),
    "timeouts": (
        "starmesh_timeouts_total",
        "Deadlines that cut work off: a route's timeout (504) and each try cut by per_try_timeout.",
        {},
    ),
    "circuit_breaker_overflows": (
        "starmesh_circuit_breaker_overflows_total",
        "Requests or tries answered 503 overflow by the circuit breaker.",
        {},
    ),
    "outlier_ejections": ("starmesh_outlier_ejections_total", "Endpoints ejected by outlier detection.", {}),
    "rate_limited": ("starmesh_rate_limited_total", "Requests answered 429 rate-limited.", {}),
    "mirror_sent": ("starmesh_mirror_requests_total", "Mirror copies, sent or dropped.", {"result": "sent"}),
    "mirror_dropped": ("starmesh_mirror_requests_total", "Mirror copies, sent or dropped.", {"result": "dropped"}),
}
"""Each service counter's metric, help text and extra labels (besides destination_service)."""


def _sum(name: str, description: str, unit: str, points: list[NumberDataPoint], *, monotonic: bool = True) -> Metric:
    data = Sum(data_points=points, aggregation_temporality=_CUMULATIVE, is_monotonic=monotonic)
    return Metric(name=name, description=description, unit=unit, data=data)


def recorder_metrics(recorder: MemoryRecorder, start_ns: int, now_ns: int) -> list[Metric]:
    """What the recorder counted since `start_ns`, as cumulative OpenTelemetry metrics (none empty)."""
    requests: list[NumberDataPoint] = []
    durations: list[HistogramDataPoint] = []
    for key, total, buckets in sorted(recorder.series()):
        direction, source, destination, version, status, reason = key
        labels: dict[str, str | int] = {
            "direction": direction, "source_service": source, "destination_service": destination,
            "destination_version": version, "response_code": status, "reason": reason,
        }  # fmt: skip
        count = sum(buckets)
        requests.append(NumberDataPoint(labels, start_ns, now_ns, count))
        durations.append(
            HistogramDataPoint(labels, start_ns, now_ns, count, total, buckets, DURATION_BUCKETS, _UNSET, _UNSET)
        )
    by_metric: dict[str, tuple[str, list[NumberDataPoint]]] = {}
    dropped: list[NumberDataPoint] = []
    for name, service, value in sorted(recorder.counts()):
        metric, description, extra = _SERVICE_COUNTERS[name]
        point = NumberDataPoint({"destination_service": service, **extra}, start_ns, now_ns, value)
        by_metric.setdefault(metric, (description, []))[1].append(point)
        if name == "mirror_dropped":  # also under its name from before `result` existed
            dropped.append(NumberDataPoint({"destination_service": service}, start_ns, now_ns, value))
    denials = [
        NumberDataPoint({"destination_service": service, "source_service": source}, start_ns, now_ns, n)
        for (service, source), n in sorted(recorder.denials())
    ]
    metrics = [
        _sum("starmesh_requests_total", "Requests answered, by hop and outcome.", "{request}", requests),
        Metric(
            name="starmesh_request_duration_seconds",
            description="Time to the response head.",
            unit="s",
            data=Histogram(data_points=durations, aggregation_temporality=_CUMULATIVE),
        ),
        *(_sum(metric, description, "{event}", points) for metric, (description, points) in by_metric.items()),
        _sum("starmesh_mirror_dropped_total", "Mirror copies not sent (bound reached, streamed body, no endpoint).",
             "{request}", dropped),
        _sum("starmesh_authorization_audit_denials_total", "Requests audit-mode authorization would deny.",
             "{request}", denials),
    ]  # fmt: skip
    return [metric for metric in metrics if metric.data.data_points]


class _Aggregates:
    """Appends the recorder's metrics to what the SDK collected (its own scope's metrics first)."""

    def __init__(self, recorder: MemoryRecorder, resource: Resource) -> None:
        self.recorder = recorder
        self.resource = resource
        self.start_ns = time.time_ns()

    def merge(self, data: MetricsData) -> MetricsData:
        ours = recorder_metrics(self.recorder, self.start_ns, time.time_ns())
        if not data.resource_metrics:
            return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(SCOPE, ours, "")], "")])
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        mine = next((i for i, s in enumerate(scopes) if s.scope == SCOPE), None)
        if mine is None:
            scopes.insert(0, ScopeMetrics(SCOPE, ours, ""))
        else:
            scopes[mine] = ScopeMetrics(SCOPE, [*ours, *scopes[mine].metrics], scopes[mine].schema_url)
        return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


class _PrometheusReader(PrometheusMetricReader):
    """The SDK's Prometheus reader (its text via a private registry), with the recorder's metrics."""

    def __init__(self, merge: Callable[[MetricsData], MetricsData], registry: CollectorRegistry) -> None:
        super().__init__(disable_target_info=True, scope_info_enabled=False, registry=registry)
        self._merge = merge

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        super()._receive_metrics(self._merge(metrics_data), timeout_millis, **kwargs)


class _PushingReader(PeriodicExportingMetricReader):
    """The SDK's periodic reader (a thread that collects and exports), with the recorder's metrics."""

    def __init__(
        self, merge: Callable[[MetricsData], MetricsData], exporter: MetricExporter, interval_millis: float | None
    ) -> None:
        super().__init__(exporter, interval_millis)
        self._merge = merge

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        super()._receive_metrics(self._merge(metrics_data), timeout_millis, **kwargs)


def _connection_gauge(meter: Meter, recorder: MemoryRecorder) -> None:
    """`starmesh_active_connections{listener}` from the recorder's cells, outbound and inbound always
    (0 before the first connection). Its points are always there, which also makes the SDK hand
    every collection to the readers: it skips them when its own instruments report nothing."""

    def observe(_: CallbackOptions) -> Iterable[Observation]:
        open_now: dict[str, int] = {"outbound": 0, "inbound": 0}
        open_now.update(recorder.open_connections())
        return [Observation(n, {"listener": listener}) for listener, n in sorted(open_now.items())]

    description = "Connections open now, by listener (mesh: inbound over mTLS)."
    meter.create_observable_up_down_counter("starmesh_active_connections", [observe], "{connection}", description)


def otlp_exporter(endpoint: str, *, timeout: float = 5.0) -> MetricExporter:
    """An OTLP/HTTP protobuf exporter to `endpoint`/v1/metrics, cumulative for every instrument."""
    # Imported here: protobuf and requests cost the idle proxy megabytes it need not carry.
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import (
        Counter,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )
    from opentelemetry.sdk.metrics import Histogram as HistogramInstrument

    kinds = (Counter, UpDownCounter, HistogramInstrument, ObservableCounter, ObservableUpDownCounter, ObservableGauge)
    return OTLPMetricExporter(
        endpoint=endpoint.rstrip("/") + "/v1/metrics",
        timeout=timeout,
        preferred_temporality={kind: _CUMULATIVE for kind in kinds},
    )


class ProxyMetrics:
    """One proxy's meter provider, its Prometheus reader and, with an exporter, its OTLP push.

    `resource` names the proxy (service, version) in OTLP. `gauges(meter)` registers the
    observable instruments for its state (otel_gauges.py); instruments made later on
    `meter` are collected too, and `provider` can be handed to SDK parts that report
    their own metrics. `exporter` (or `otlp_endpoint`, which builds the OTLP exporter)
    gets a periodic push every `export_interval` seconds (None: $OTEL_METRIC_EXPORT_INTERVAL
    ms, else 60 s)."""

    def __init__(
        self,
        recorder: MemoryRecorder,
        *,
        resource: Mapping[str, str] | None = None,
        gauges: Callable[[Meter], None] | None = None,
        otlp_endpoint: str | None = None,
        exporter: MetricExporter | None = None,
        export_interval: float | None = None,
    ) -> None:
        attributes = {"service.name": "starmesh-proxy", **(resource or {})}
        self._aggregates = _Aggregates(recorder, Resource(attributes))
        merge = self._aggregates.merge
        self.registry = CollectorRegistry(auto_describe=False)
        self._rendering = threading.Lock()  # one scrape at a time: the reader queues what it collects
        readers: list[MetricReader] = [_PrometheusReader(merge, self.registry)]
        if exporter is None and otlp_endpoint is not None:
            exporter = otlp_exporter(otlp_endpoint)
        if exporter is not None:
            interval = None if export_interval is None else export_interval * 1000.0
            readers.append(_PushingReader(merge, exporter, interval))
        self.provider = MeterProvider(
            metric_readers=readers, resource=self._aggregates.resource, shutdown_on_exit=False
        )
        self.meter = self.provider.get_meter(SCOPE.name)
        _connection_gauge(self.meter, recorder)
        if gauges is not None:
            gauges(self.meter)

    def render(self) -> bytes:
        """The Prometheus text exposition (0.0.4) of everything: what admin /metrics serves.

        Safe from any thread (the admin listener renders in a worker thread: thousands of
        samples take tens of milliseconds, which the event loop should not wait out)."""
        with self._rendering:
            return generate_latest(self.registry)

    def flush(self, timeout_millis: float = 10_000) -> bool:
        """Collect and push now (OTLP); True when every reader finished in time."""
        return self.provider.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 5_000) -> None:
        """A last push (OTLP), then stop the reader threads; blocks up to `timeout_millis`."""
        self.provider.shutdown(timeout_millis)


def recorder_text(recorder: MemoryRecorder) -> str:
    """The Prometheus text of one recorder alone (`MemoryRecorder.render`)."""
    metrics = ProxyMetrics(recorder)
    try:
        return metrics.render().decode()
    finally:
        metrics.shutdown()
