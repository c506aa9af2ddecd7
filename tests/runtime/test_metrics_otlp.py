"""The OTLP path: it exports the same numbers as /metrics, a real proxy pushes them over
OTLP/HTTP with --otlp-endpoint, and without one the OTLP exporter is never imported."""

from __future__ import annotations

import asyncio
import gzip
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics.export import (
    Histogram,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
)
from prometheus_client.parser import text_string_to_metric_families

from starmesh.runtime.apply import Applier
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.otel_gauges import StateSources, register_state_gauges
from starmesh.runtime.otel_metrics import ProxyMetrics
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {"v1": 100}, retries = retries(attempts = 1, per_try_timeout = "1s"))])
"""

Sample = tuple[str, frozenset[tuple[str, str]]]


def prometheus_samples(text: str) -> dict[Sample, float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def _label(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def otlp_samples(data: MetricsData) -> dict[Sample, float]:
    """OpenTelemetry metric data as the Prometheus samples it stands for (counters, gauges,
    histograms as _bucket{le}/_count/_sum)."""
    found: dict[Sample, float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    labels = frozenset((k, _label(v)) for k, v in (point.attributes or {}).items())
                    if isinstance(metric.data, Histogram):
                        running = 0
                        bounds = [*(repr(float(b)) for b in point.explicit_bounds), "+Inf"]
                        for bound, n in zip(bounds, point.bucket_counts, strict=True):
                            running += n
                            found[f"{metric.name}_bucket", labels | {("le", bound)}] = running
                        found[f"{metric.name}_count", labels] = point.count
                        found[f"{metric.name}_sum", labels] = point.sum
                    else:
                        assert isinstance(point, NumberDataPoint)
                        found[metric.name, labels] = point.value
    return found


class MemoryExporter(MetricExporter):
    """Keeps what it is asked to export."""

    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def test_the_otlp_export_carries_the_same_numbers_as_the_prometheus_text(tmp_path: Path, rt: Any) -> None:
    recorder = MemoryRecorder()
    deps = ChainDeps(pool=UpstreamPool(), endpoints=Endpoints(), state=StateRegistry(), recorder=recorder,
                     local_service="web")  # fmt: skip
    applier = Applier(deps, app="127.0.0.1:1", state_dir=None)
    data = rt.compile_policy(tmp_path / "policy", POLICY)
    assert asyncio.run(applier.apply(data, expected_digest=None, release_version=None, origin="file")).ok
    assert not asyncio.run(applier.apply(b"{}", expected_digest=None, release_version=None, origin="file")).ok
    draw = random.Random(7)
    for direction, source, destination in (("outbound", "web", "api"), ("inbound", "front", "web")):
        record = recorder.bind(direction, source, destination)
        for _ in range(50):
            record("v1", draw.choice((200, 200, 503)), draw.choice(("", "overflow")), draw.expovariate(20.0))
    recorder.count("retries", "api").n += 4
    recorder.count("mirror_dropped", "api").n += 1
    recorder.connections("outbound").n += 2

    exporter = MemoryExporter()
    metrics = ProxyMetrics(
        recorder,
        gauges=lambda meter: register_state_gauges(meter, StateSources(applier)),
        exporter=exporter,
        export_interval=3600.0,  # only the flush below exports
    )
    try:
        text = metrics.render().decode()
        assert metrics.flush()
    finally:
        metrics.shutdown()
    assert len(exporter.exported) >= 1
    pushed = otlp_samples(exporter.exported[0])
    served = prometheus_samples(text)
    assert pushed == served
    assert pushed["starmesh_retries_total", frozenset({("destination_service", "api")})] == 4
    assert sum(v for (name, _), v in pushed.items() if name == "starmesh_requests_total") == 100
    rejected = frozenset({("result", "rejected"), ("reason", "invalid-bundle")})
    assert pushed["starmesh_config_apply_total", rejected] == 1
    assert {name for name, _ in pushed} >= {"starmesh_request_duration_seconds_bucket", "starmesh_active_connections",
                                            "starmesh_config_release_version", "starmesh_config_bundle_info"}


# -- a real proxy and a real OTLP/HTTP receiver --------------------------------------------------


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1:0 (aiohttp on `apps`' background loop) keeping every
    metrics export."""

    def __init__(self, apps: Any) -> None:
        self.exports: list[ExportMetricsServiceRequest] = []

        async def metrics(request: web.Request) -> web.Response:
            body = await request.read()
            if request.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            export = ExportMetricsServiceRequest()
            export.ParseFromString(body)
            self.exports.append(export)
            return web.Response(body=b"", content_type="application/x-protobuf")

        async def other(_: web.Request) -> web.Response:  # traces, which this test does not read
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/metrics", metrics)
        app.router.add_post("/{tail:.*}", other)
        self.url = "http://" + apps.serve(app)

    def requests_counted(self) -> list[float]:
        """Per export, the sum of starmesh_requests_total over its series."""
        totals = []
        for export in list(self.exports):
            total = 0.0
            for resource in export.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == "starmesh_requests_total":
                            total += sum(p.as_int or p.as_double for p in metric.sum.data_points)
            totals.append(total)
        return totals


@pytest.fixture
def receiver(rt: Any) -> Iterator[Receiver]:
    apps = rt.BackgroundApps()
    try:
        yield Receiver(apps)
    finally:
        apps.close()


def _wait(check: Callable[[], object], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"not within {DEADLINE}s: {what}")
        time.sleep(0.05)


def test_a_proxy_pushes_its_metrics_over_otlp_http(
    mesh: Any, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")  # ms; the proxy inherits it
    app = mesh.app("v1")
    endpoints = mesh.endpoints({"api": {"v1": [app.address]}})
    proxy = mesh.start_proxy("web", "v1", "127.0.0.1:1", mesh.bundle(POLICY), endpoints,
                             ["--otlp-endpoint", receiver.url + "/"], state=tmp_path / "state")  # fmt: skip
    assert proxy.read_status().startswith("ready ")
    for _ in range(7):
        assert proxy.http("outbound", "/", {"Host": "api"}).status == 200
    _wait(lambda: 7 in receiver.requests_counted(), "an export counting the 7 requests")
    export = receiver.exports[-1]
    resource = {kv.key: kv.value.string_value for kv in export.resource_metrics[0].resource.attributes}
    assert (resource["service.name"], resource["service.version"]) == ("web", "v1")
    names = {m.name for r in export.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert {"starmesh_requests_total", "starmesh_request_duration_seconds", "starmesh_config_apply_total"} <= names
    # Spans are exported too (to the same endpoint): what the export queue refuses is counted.
    assert "starmesh_trace_spans_dropped_total" in names
    scraped = proxy.http("admin", "/metrics").body.decode().splitlines()
    assert "starmesh_trace_spans_dropped_total 0.0" in scraped


def test_an_otlp_endpoint_must_be_an_http_url(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from starmesh.cli.main import main

    argv = ["proxy", "--service", "web", "--version", "v1", "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0",
            "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
            "--bundle", __file__, "--otlp-endpoint", "ftp://collector:4318"]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert result.output.startswith("starmesh: error: --otlp-endpoint 'ftp://collector:4318': give an http://")
    assert not (tmp_path / "s").exists()  # nothing changed


def test_without_an_endpoint_the_otlp_exporter_is_never_imported() -> None:
    """The idle proxy's memory budget: protobuf, requests and the exporter come with --otlp-endpoint only."""
    code = """
import sys
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.otel_metrics import ProxyMetrics
import starmesh.runtime.proxy
metrics = ProxyMetrics(MemoryRecorder())
metrics.render()
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.exporter.otlp", "google.protobuf", "requests")))
print(loaded)
"""
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, check=True)
    assert shown.stdout.strip() == "[]", shown.stdout
