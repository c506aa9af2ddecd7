"""The proxy's state on /metrics in the control-plane form: the applied release and bundle,
applies by result and reason, releases behind after a refused release, the control plane's
last contact; and the reason words a rejected apply is counted under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from starmesh.runtime.otel_gauges import rejection_reason


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of `name{labels}` in a Prometheus text (prometheus_client parses it), None when absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def test_release_apply_results_releases_behind_and_last_contact(
    tmp_path: Path, planes: Any, proxies: Any, bundles: Any, rt: Any
) -> None:
    cp = planes()
    proxy = proxies.start(control_plane=[cp.url], trust=[rt.trust_file(tmp_path, cp.key)])
    before = proxy.http("admin", "/metrics").body.decode()
    assert sample(before, "starmesh_config_release_version") == -1
    assert sample(before, "starmesh_config_releases_behind") == 0
    assert sample(before, "starmesh_config_last_apply_timestamp_seconds") is None  # nothing applied yet

    first = cp.publish(bundles.v1)
    proxy.next_line(lambda line: line.startswith("applied release 1 "), "release 1 applied")
    second = cp.publish(bundles.golden_failing)  # refused by the proxy: a NACK
    cp.wait_for(lambda: any(r["version"] == 2 and r["error"] for r in cp.reports_of()), "the NACK of release 2")

    text = proxy.http("admin", "/metrics").body.decode()
    assert sample(text, "starmesh_config_release_version") == 1
    assert sample(text, "starmesh_config_bundle_info", digest=first.digest) == 1
    assert sample(text, "starmesh_config_bundle_info", digest=second.digest) is None
    assert sample(text, "starmesh_config_apply_total", result="ok", reason="") == 1
    assert sample(text, "starmesh_config_apply_total", result="rejected", reason="golden-requests") == 1
    assert sample(text, "starmesh_config_releases_behind") == 1
    contact = sample(text, "starmesh_control_plane_last_contact_seconds")
    assert contact is not None and 0 <= contact < float("inf")
    assert sample(text, "starmesh_certificate_expiry_seconds") is None  # no --ca-cert

    cp.publish(bundles.v2)
    proxy.next_line(lambda line: line.startswith("applied release 3 "), "release 3 applied")
    text = proxy.http("admin", "/metrics").body.decode()
    assert sample(text, "starmesh_config_release_version") == 3
    assert sample(text, "starmesh_config_releases_behind") == 0
    assert sample(text, "starmesh_config_apply_total", result="ok", reason="") == 2


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("cannot read bundle file b.json: No such file or directory", "unreadable"),
        ("bundle rejected: bundle digest mismatch: expected sha256:1, got sha256:2", "digest-mismatch"),
        ("bundle rejected: invalid bundle: not valid JSON", "invalid-bundle"),
        ("bundle rejected by the proxy's validation: a regex does not compile", "validation"),
        ("route table: api: boom", "validation"),
        ("golden requests failed against the new route table: api goes to v1", "golden-requests"),
        ("release 4: fetching bundle sha256:ab failed: HTTP 404", "fetch-failed"),
        ("release 3 from http://127.0.0.1:1 refused: signature by an untrusted key", "release-refused"),
        ("endpoints.json: service 'nope' is not declared by the bundle", "endpoints"),
        ("something new", "other"),
    ],
)
def test_a_rejected_apply_is_counted_under_a_bounded_reason(error: str, reason: str) -> None:
    assert rejection_reason(error) == reason
