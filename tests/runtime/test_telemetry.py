"""MemoryRecorder: a route's bound recorder counts the same series as `request`; the cells
it hands out are shared; its text (OpenTelemetry's, parsed by prometheus_client) agrees."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from starmesh.runtime.telemetry import MemoryRecorder


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_bound_recorder_counts_the_same_series_as_request() -> None:
    recorder = MemoryRecorder()
    record = recorder.bind("outbound", "client", "app")
    record("v1", 200, "", 0.002)
    record("v1", 200, "", 0.003)
    record("v2", 503, "overflow", 0.0)
    recorder.request("outbound", "client", "app", "v1", 200, "", 0.5)
    assert recorder.requests_total(destination_version="v1", response_code=200) == 3
    assert recorder.requests_total(reason="overflow", source_service="client", destination_service="app") == 1
    assert recorder.requests_total() == 4
    found = samples(recorder.render())
    labels = {"direction": "outbound", "source_service": "client", "destination_service": "app",
              "destination_version": "v1", "response_code": "200", "reason": ""}  # fmt: skip
    assert found["starmesh_requests_total", frozenset(labels.items())] == 3
    assert found["starmesh_request_duration_seconds_bucket", frozenset({**labels, "le": "0.005"}.items())] == 2
    assert found["starmesh_request_duration_seconds_bucket", frozenset({**labels, "le": "+Inf"}.items())] == 3
    assert found["starmesh_request_duration_seconds_count", frozenset(labels.items())] == 3
    assert found["starmesh_request_duration_seconds_sum", frozenset(labels.items())] == 0.505
    # A second binding of the same labels adds to the same series.
    recorder.bind("outbound", "client", "app")("v1", 200, "", 0.001)
    assert recorder.requests_total(destination_version="v1") == 4


def test_cells_are_shared_per_service_and_listener_and_render_as_their_metrics() -> None:
    recorder = MemoryRecorder()
    assert recorder.count("retries", "api") is recorder.count("retries", "api")
    assert recorder.count("retries", "api") is not recorder.count("retries", "web")
    recorder.count("retries", "api").n += 2
    recorder.count("timeouts", "api")  # bound, never counted: a zero series
    recorder.count("mirror_sent", "api").n += 3
    recorder.count("mirror_dropped", "api").n += 1
    recorder.connections("outbound").n += 1
    recorder.audit_denied("api", None, "GET", "/a/path/never/a/label")
    found = samples(recorder.render())
    assert found["starmesh_retries_total", frozenset({("destination_service", "api")})] == 2
    assert found["starmesh_timeouts_total", frozenset({("destination_service", "api")})] == 0
    assert ("starmesh_retries_total", frozenset({("destination_service", "web")})) in found
    sent, dropped = ({("destination_service", "api"), ("result", r)} for r in ("sent", "dropped"))
    assert found["starmesh_mirror_requests_total", frozenset(sent)] == 3
    assert found["starmesh_mirror_requests_total", frozenset(dropped)] == 1
    assert found["starmesh_mirror_dropped_total", frozenset({("destination_service", "api")})] == 1
    assert recorder.mirror_drops == {"api": 1}
    denial = frozenset({("destination_service", "api"), ("source_service", "")})
    assert found["starmesh_authorization_audit_denials_total", denial] == 1
    assert found["starmesh_active_connections", frozenset({("listener", "outbound")})] == 1
    assert found["starmesh_active_connections", frozenset({("listener", "inbound")})] == 0
    assert not any("/a/path" in value for _, labels in found for _, value in labels)
