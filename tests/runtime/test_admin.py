"""The admin listener in-process: /healthz, /readyz, /config, /explain, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import starmesh.runtime.table as table_module
from starmesh.bundle.canonical import decode_bundle
from starmesh.bundle.decide import DecisionTable, RequestInfo
from starmesh.compiler.compile import compile_tree
from starmesh.runtime.admin import AdminInfo, start_admin
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.otel_gauges import StateSources, register_state_gauges
from starmesh.runtime.otel_metrics import ProxyMetrics
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.apply import Applier
from starmesh.runtime.endpoints import Endpoints

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [
    rule(match = [match(headers = {"x-canary": "1"})], backends = {"v2": 100}),
    rule(backends = {"v1": 100}),
])
"""


class _Pool:
    def retain(self, endpoints: frozenset[str]) -> None:
        pass


class _State:
    def retain(self, services: Any, endpoints: Any = None) -> None:
        pass

    def transaction(self) -> _State:
        return self

    def commit(self) -> None:
        pass


@pytest.fixture(autouse=True)
def chains(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(*args: Any) -> Callable[[Any], Awaitable[Any]]:
        async def handler(request: Any) -> Any:
            raise AssertionError("not called")

        return handler

    monkeypatch.setattr(table_module, "build_outbound", build)
    monkeypatch.setattr(table_module, "build_inbound", build)


def bundle_bytes(tmp_path: Path) -> bytes:
    (tmp_path / "mesh.star").write_text(POLICY)
    result = compile_tree(tmp_path)
    assert result.data is not None, result.findings
    return result.data


async def with_admin(applier: Applier, check: Callable[[aiohttp.ClientSession, str], Awaitable[None]]) -> None:
    metrics = ProxyMetrics(MemoryRecorder(), gauges=lambda meter: register_state_gauges(meter, StateSources(applier)))
    info = AdminInfo(
        service="web",
        version="v1",
        listeners={"outbound": "127.0.0.1:1", "inbound": "127.0.0.1:2", "app": "127.0.0.1:3"},
        metrics=metrics.render,
        not_ready=lambda: "bundle file b.json not applied: it is broken",
    )
    runner, address = await start_admin(applier, info, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            await check(session, f"http://{address}")
    finally:
        await runner.cleanup()
        metrics.shutdown()


def make_applier() -> Applier:
    deps = ChainDeps(
        pool=_Pool(),  # type: ignore[arg-type]
        state=_State(),  # type: ignore[arg-type]
        endpoints=Endpoints(),
        recorder=MemoryRecorder(),
        local_service="web",
    )
    return Applier(deps, app="127.0.0.1:3", state_dir=None)


def test_not_ready_before_a_config(tmp_path: Path) -> None:
    applier = make_applier()

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(base + "/healthz") as r:
            assert r.status == 200
        async with session.get(base + "/readyz") as r:
            assert r.status == 503
            assert await r.text() == "not ready: bundle file b.json not applied: it is broken\n"
        async with session.get(base + "/config") as r:
            config = await r.json()
        assert config == {
            "release_version": None,
            "bundle": None,
            "applied_at": None,
            "origin": None,
            "service": "web",
            "version": "v1",
            "last_error": None,
            "listeners": {"outbound": "127.0.0.1:1", "inbound": "127.0.0.1:2", "app": "127.0.0.1:3"},
            "control_plane": None,
        }
        async with session.get(base + "/explain?service=api") as r:
            assert r.status == 503
            assert "not ready" in (await r.json())["error"]

    asyncio.run(with_admin(applier, check))


def test_ready_config_explain_and_metrics_after_an_apply(tmp_path: Path, rt: Any) -> None:
    applier = make_applier()
    data = bundle_bytes(tmp_path)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        result = await applier.apply(data, expected_digest=None, release_version=None, origin="file")
        assert result.ok
        async with session.get(base + "/readyz") as r:
            assert (r.status, await r.text()) == (200, "ready\n")
        async with session.get(base + "/config") as r:
            config = await r.json()
        assert config["bundle"] == result.digest and config["origin"] == "file"
        assert config["release_version"] is None and config["applied_at"].endswith("Z")
        params = [("service", "api"), ("path", "/x?y=1"), ("method", "post"), ("header", "X-Canary: 1"),
                  ("header", "x-other:a"), ("source", "web")]
        async with session.get(base + "/explain", params=params) as r:
            assert r.status == 200
            explained = await r.json()
        expected = DecisionTable.build(decode_bundle(data).spec).explain(
            RequestInfo(service="api", method="post", path="/x?y=1", headers=(("X-Canary", "1"), ("x-other", "a")),
                        source="web")
        ).to_json()
        assert explained == expected
        assert explained["backends"] == {"v2": 100}
        async with session.get(base + "/explain?service=nope") as r:
            assert r.status == 404
            assert (await r.json())["error"] == "unknown service 'nope': the bundle does not declare it"
        async with session.get(base + "/explain?service=api&header=broken") as r:
            assert r.status == 400
        async with session.get(base + "/explain") as r:
            assert r.status == 400
        async with session.get(base + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        assert rt.sample(text, "starmesh_config_release_version") == -1
        assert rt.sample(text, "starmesh_config_apply_total", result="ok", reason="") == 1
        assert rt.sample(text, "starmesh_config_bundle_info", digest=result.digest or "") == 1

    asyncio.run(with_admin(applier, check))


def test_config_reports_the_last_rejected_apply(tmp_path: Path, rt: Any) -> None:
    applier = make_applier()
    data = bundle_bytes(tmp_path)

    async def check(session: aiohttp.ClientSession, base: str) -> None:
        await applier.apply(data, expected_digest=None, release_version=None, origin="file")
        rejected = await applier.apply(b"{}", expected_digest=None, release_version=None, origin="file")
        assert not rejected.ok
        async with session.get(base + "/config") as r:
            config = await r.json()
        assert config["bundle"] == applier.applied.digest if applier.applied else False
        assert config["last_error"]["origin"] == "file"
        assert config["last_error"]["error"].startswith("bundle rejected: invalid bundle")
        async with session.get(base + "/metrics") as r:
            text = await r.text()
        assert rt.sample(text, "starmesh_config_apply_total", result="rejected", reason="invalid-bundle") == 1
        assert rt.sample(text, "starmesh_config_apply_total", result="ok", reason="") == 1

    asyncio.run(with_admin(applier, check))
