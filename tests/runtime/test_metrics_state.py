"""The proxy's state on /metrics in the control-plane form: the applied release and bundle,
applies by result and reason, releases behind after a refused release, the control plane's
last contact; and rejected applies counted exactly under the reason each was refused for."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from starmesh.bundle.canonical import digest_of
from starmesh.runtime.apply import Applier, ApplyResult
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.errors import REJECT_REASONS
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.otel_gauges import StateSources, register_state_gauges
from starmesh.runtime.otel_metrics import ProxyMetrics
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder


def test_release_apply_results_releases_behind_and_last_contact(
    tmp_path: Path, planes: Any, proxies: Any, bundles: Any, rt: Any
) -> None:
    cp = planes()
    proxy = proxies.start(control_plane=[cp.url], trust=[rt.trust_file(tmp_path, cp.key)])
    before = proxy.http("admin", "/metrics").body.decode()
    assert rt.sample(before, "starmesh_config_release_version") == -1
    assert rt.sample(before, "starmesh_config_releases_behind") == 0
    assert rt.sample(before, "starmesh_config_last_apply_timestamp_seconds") is None  # nothing applied yet

    first = cp.publish(bundles.v1)
    proxy.next_line(lambda line: line.startswith("applied release 1 "), "release 1 applied")
    second = cp.publish(bundles.golden_failing)  # refused by the proxy: a NACK
    cp.wait_for(lambda: any(r["version"] == 2 and r["error"] for r in cp.reports_of()), "the NACK of release 2")

    text = proxy.http("admin", "/metrics").body.decode()
    assert rt.sample(text, "starmesh_config_release_version") == 1
    assert rt.sample(text, "starmesh_config_bundle_info", digest=first.digest) == 1
    assert rt.sample(text, "starmesh_config_bundle_info", digest=second.digest) is None
    assert rt.sample(text, "starmesh_config_apply_total", result="ok", reason="") == 1
    assert rt.sample(text, "starmesh_config_apply_total", result="rejected", reason="golden-requests") == 1
    assert rt.sample(text, "starmesh_config_releases_behind") == 1
    contact = rt.sample(text, "starmesh_control_plane_last_contact_seconds")
    assert contact is not None and 0 <= contact < float("inf")
    assert rt.sample(text, "starmesh_certificate_expiry_seconds") is None  # no --ca-cert

    cp.publish(bundles.v2)
    proxy.next_line(lambda line: line.startswith("applied release 3 "), "release 3 applied")
    text = proxy.http("admin", "/metrics").body.decode()
    assert rt.sample(text, "starmesh_config_release_version") == 3
    assert rt.sample(text, "starmesh_config_releases_behind") == 0
    assert rt.sample(text, "starmesh_config_apply_total", result="ok", reason="") == 2


def test_rejections_between_two_scrapes_are_each_counted_under_their_own_reason(bundles: Any, rt: Any) -> None:
    deps = ChainDeps(pool=UpstreamPool(), endpoints=Endpoints(), state=StateRegistry(), recorder=MemoryRecorder(),
                     local_service="web")  # fmt: skip
    applier = Applier(deps, app="127.0.0.1:9", state_dir=None)
    metrics = ProxyMetrics(MemoryRecorder(), gauges=lambda meter: register_state_gauges(meter, StateSources(applier)))

    async def applies() -> list[ApplyResult]:
        def apply(data: bytes, **kw: Any) -> Awaitable[ApplyResult]:
            return applier.apply(data, expected_digest=kw.pop("expected_digest", None), release_version=None,
                                 origin="file", **kw)  # fmt: skip

        try:
            return [
                await apply(bundles.v1),
                await apply(b"{not json"),
                await apply(bundles.v2, expected_digest=digest_of(bundles.v1)),
                await apply(bundles.golden_failing),
                await apply(bundles.golden_failing),
                await apply(bundles.v2, endpoints={"nope": {"v1": ("127.0.0.1:7001",)}}),
                applier.reject("file", "cannot read bundle file b.json: No such file", reason="unreadable"),
            ]
        finally:
            await deps.pool.close()

    try:
        results = asyncio.run(applies())
        text = metrics.render().decode()
    finally:
        metrics.shutdown()
    assert [result.ok for result in results] == [True] + [False] * 6
    rejected = {
        found.labels["reason"]: found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == "starmesh_config_apply_total" and found.labels["result"] == "rejected"
    }
    # Six refusals, five reasons, one scrape: each under its own reason, not the last one's.
    assert rejected == {
        "invalid-bundle": 1, "digest-mismatch": 1, "golden-requests": 2, "endpoints": 1, "unreadable": 1,
    }  # fmt: skip
    assert rt.sample(text, "starmesh_config_apply_total", result="ok", reason="") == 1
    assert set(rejected) <= set(REJECT_REASONS)
