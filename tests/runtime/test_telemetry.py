"""MemoryRecorder: a route's bound recorder counts the same series as `request`."""

from __future__ import annotations

from starmesh.runtime.telemetry import MemoryRecorder


def test_a_bound_recorder_counts_the_same_series_as_request() -> None:
    recorder = MemoryRecorder()
    record = recorder.bind("outbound", "client", "app")
    record("v1", 200, "", 0.002)
    record("v1", 200, "", 0.003)
    record("v2", 503, "overflow", 0.0)
    recorder.request("outbound", "client", "app", "v1", 200, "", 0.5)
    assert recorder.requests_total(destination_version="v1", response_code=200) == 3
    assert recorder.requests_total(reason="overflow", source_service="client", destination_service="app") == 1
    text = recorder.render()
    labels = 'direction="outbound",source_service="client",destination_service="app",destination_version="v1"'
    assert f'starmesh_requests_total{{{labels},response_code="200",reason=""}} 3' in text
    assert f'starmesh_request_duration_seconds_bucket{{{labels},response_code="200",reason="",le="0.005"}} 2' in text
    # A second binding of the same labels adds to the same series.
    recorder.bind("outbound", "client", "app")("v1", 200, "", 0.001)
    assert recorder.requests_total(destination_version="v1") == 4
