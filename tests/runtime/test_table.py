"""RouteTable: route matching picks the rule's prebuilt chain; no-route answers; build errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import starmesh.runtime.table as table_module
from starmesh.bundle.canonical import Bundle, decode_bundle
from starmesh.compiler.compile import compile_tree
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.errors import ConfigRejected
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.message import EMPTY, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.table import RouteTable
from starmesh.runtime.telemetry import MemoryRecorder

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
service(name = "docs", versions = ["v1"])
http_route("api", rules = [
    rule(match = [match(headers = {"x-canary": "1"})], backends = {"v2": 100}),
    rule(match = [match(headers = {"x-tags": regex("a,b")})], backends = {"v2": 100}),
    rule(backends = {"v1": 100}),
])
http_route("docs", rules = [rule(match = [match(path_prefix = "/docs")])])
"""


def compile_policy(tmp_path: Path, text: str) -> tuple[Bundle, str]:
    root = tmp_path / "policy"
    root.mkdir(exist_ok=True)
    (root / "mesh.star").write_text(text)
    result = compile_tree(root)
    assert result.ok and result.data is not None and result.digest is not None, result.findings
    return decode_bundle(result.data), result.digest


def fake_chains(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in chains: each answers with the route it was built for, in a header."""
    built: list[str] = []

    def build_outbound(service: Any, rule: Any, deps: Any) -> Callable[[Request], Awaitable[Response]]:
        name = f"{service.name}/{rule.index}"
        built.append(name)

        async def handler(request: Request) -> Response:
            return Response(200, [("x-route", name)])

        return handler

    def build_inbound(service: Any, deps: Any, app: str) -> Callable[[Request], Awaitable[Response]]:
        built.append(f"inbound {None if service is None else service.name} -> {app}")

        async def handler(request: Request) -> Response:
            return Response(200, [("x-route", "inbound")])

        return handler

    monkeypatch.setattr(table_module, "build_outbound", build_outbound)
    monkeypatch.setattr(table_module, "build_inbound", build_inbound)
    return built


def deps(local: str = "web") -> ChainDeps:
    """Real deps (the chains themselves are faked by `fake_chains`; nothing connects)."""
    return ChainDeps(
        pool=UpstreamPool(), endpoints=Endpoints(), state=StateRegistry(), recorder=MemoryRecorder(), local_service=local
    )


def request(service: str, path: str = "/", headers: list[tuple[str, str]] | None = None) -> Request:
    path, _, query = path.partition("?")
    return Request("GET", path, query or None, headers or [], EMPTY, service=service)


def answer(table: RouteTable, req: Request) -> Response:
    async def go() -> Response:
        return await table.outbound(req)

    return asyncio.run(go())


def test_builds_one_chain_per_rule_and_one_inbound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = fake_chains(monkeypatch)
    bundle, digest = compile_policy(tmp_path, POLICY)
    table = RouteTable.build(bundle, digest, deps(), app="127.0.0.1:9")
    assert sorted(built) == sorted(["web/None", "api/0", "api/1", "api/2", "docs/0", "inbound web -> 127.0.0.1:9"])
    assert table.digest == digest and table.bundle is bundle


def test_outbound_routes_to_the_winning_rules_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_chains(monkeypatch)
    bundle, digest = compile_policy(tmp_path, POLICY)
    table = RouteTable.build(bundle, digest, deps(), app="127.0.0.1:9")
    assert answer(table, request("api")).headers == [("x-route", "api/2")]
    assert answer(table, request("api", headers=[("x-canary", "1")])).headers == [("x-route", "api/0")]
    assert answer(table, request("web", "/anything?q=1")).headers == [("x-route", "web/None")]


def test_repeated_headers_are_joined_for_matching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_chains(monkeypatch)
    bundle, digest = compile_policy(tmp_path, POLICY)
    table = RouteTable.build(bundle, digest, deps(), app="127.0.0.1:9")
    joined = request("api", headers=[("x-tags", "a"), ("x-tags", "b")])
    assert answer(table, joined).headers == [("x-route", "api/1")]


def test_unknown_service_and_unmatched_rule_are_404_no_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_chains(monkeypatch)
    bundle, digest = compile_policy(tmp_path, POLICY)
    table = RouteTable.build(bundle, digest, deps(), app="127.0.0.1:9")
    unknown = answer(table, request("nope"))
    assert (unknown.status, unknown.error) == (404, "no-route")
    assert b"unknown service 'nope'" in (unknown.body.complete() or b"")
    unmatched = answer(table, request("docs", "/elsewhere"))
    assert (unmatched.status, unmatched.error) == (404, "no-route")
    assert answer(table, request("docs", "/docs/x")).headers == [("x-route", "docs/0")]


def test_inbound_uses_the_local_services_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = fake_chains(monkeypatch)
    bundle, digest = compile_policy(tmp_path, POLICY)
    table = RouteTable.build(bundle, digest, deps("not-in-bundle"), app="127.0.0.1:9")
    assert "inbound None -> 127.0.0.1:9" in built

    async def go() -> Response:
        return await table.inbound(request("not-in-bundle"))

    assert asyncio.run(go()).headers == [("x-route", "inbound")]


def test_a_chain_that_cannot_be_built_is_a_clear_rejection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_chains(monkeypatch)

    def broken(service: Any, rule: Any, deps: Any) -> Any:
        if service.name == "api" and rule.index == 1:
            raise ValueError("endpoint 'x' is not host:port")
        return lambda request: None

    monkeypatch.setattr(table_module, "build_outbound", broken)
    bundle, digest = compile_policy(tmp_path, POLICY)
    with pytest.raises(ConfigRejected, match=r"route table: route/api/1: endpoint 'x' is not host:port"):
        RouteTable.build(bundle, digest, deps(), app="127.0.0.1:9")
