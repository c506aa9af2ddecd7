"""Applier: the one apply path (decode, validate, build, golden requests, swap, last-known-good)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import starmesh.runtime.table as table_module
from starmesh.bundle.canonical import Bundle, decode_bundle, digest_of, encode_bundle
from starmesh.bundle.spec import RequestTest
from starmesh.compiler.compile import compile_tree
from starmesh.runtime.apply import Applier, ApplyResult
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.endpoints import Endpoints, parse_address, parse_endpoints
from starmesh.runtime.errors import EndpointsError, LastKnownGoodError
from starmesh.runtime.lkg import GENERATION_FILES, load_last_known_good

NEWEST = GENERATION_FILES[0]  # the first save goes to the first slot
from starmesh.runtime.message import EMPTY, Request, Response

APP = "127.0.0.1:9"

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"], endpoints = {{"v1": ["127.0.0.1:7001"]}})
http_route("api", rules = [rule(backends = {{"{version}": 100}})])
request_test(name = "api goes to {version}", service = "api", backends = "{version}")
"""


def compile_policy(tmp_path: Path, version: str = "v1") -> bytes:
    root = tmp_path / f"policy-{version}"
    root.mkdir(exist_ok=True)
    (root / "mesh.star").write_text(POLICY.format(version=version))
    result = compile_tree(root)
    assert result.ok and result.data is not None, result.findings
    return result.data


def with_spec(data: bytes, **changes: Any) -> bytes:
    """The bundle with spec fields replaced, re-encoded canonically (a new digest)."""
    bundle = decode_bundle(data)
    spec = msgspec.structs.replace(bundle.spec, **changes)
    return encode_bundle(msgspec.structs.replace(bundle, spec=spec))[0]


class Pool:
    def __init__(self) -> None:
        self.retained: list[frozenset[str]] = []

    def retain(self, endpoints: frozenset[str]) -> None:
        self.retained.append(frozenset(endpoints))


class State:
    def __init__(self) -> None:
        self.retained: list[tuple[frozenset[str], frozenset[str] | None]] = []

    def retain(self, services: Any, endpoints: frozenset[str] | None = None) -> None:
        self.retained.append((frozenset(services), endpoints))

    def transaction(self) -> State:
        return self

    def commit(self) -> None:
        pass


@pytest.fixture(autouse=True)
def chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in chains: each answers with the digest of the bundle it was built for."""

    def build_outbound(service: Any, rule: Any, deps: Any) -> Callable[[Request], Awaitable[Response]]:
        backend = rule.backends[0] if rule.backends else "all"

        async def handler(request: Request) -> Response:
            return Response(200, [("x-backend", backend)])

        return handler

    def build_inbound(service: Any, deps: Any, app: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return Response(200, [])

        return handler

    monkeypatch.setattr(table_module, "build_outbound", build_outbound)
    monkeypatch.setattr(table_module, "build_inbound", build_inbound)


def make_applier(state_dir: Path | None) -> Applier:
    deps = ChainDeps(
        pool=Pool(),  # type: ignore[arg-type]
        state=State(),  # type: ignore[arg-type]
        endpoints=Endpoints(),
        recorder=MemoryRecorder(),
        local_service="web",
    )
    return Applier(deps, app=APP, state_dir=state_dir)


def apply(applier: Applier, data: bytes, **kw: Any) -> ApplyResult:
    kw.setdefault("expected_digest", None)
    kw.setdefault("release_version", None)
    kw.setdefault("origin", "file")
    return asyncio.run(applier.apply(data, **kw))


def backend_of(applier: Applier) -> str:
    table = applier.current
    assert table is not None

    async def go() -> Response:
        return await table.outbound(Request("GET", "/", None, [], EMPTY, service="api"))

    return dict(asyncio.run(go()).headers)["x-backend"]


def test_apply_swaps_in_the_table_and_persists_last_known_good(tmp_path: Path) -> None:
    applier = make_applier(tmp_path / "state")
    data = compile_policy(tmp_path)
    result = apply(applier, data)
    assert result == ApplyResult(True, None, digest_of(data), None, changed=True)
    assert applier.current is not None and applier.current.digest == digest_of(data)
    assert applier.applied is not None and applier.applied.origin == "file"
    assert applier.applied.applied_at.endswith("Z")
    assert backend_of(applier) == "v1"
    lkg = load_last_known_good(tmp_path / "state")
    assert lkg is not None
    assert (lkg.data, lkg.digest, lkg.origin, lkg.release_version) == (data, digest_of(data), "file", None)
    names = sorted(p.relative_to(tmp_path / "state").as_posix() for p in (tmp_path / "state").rglob("*"))
    assert names == ["bundles", f"bundles/{digest_of(data).replace(':', '-')}.json", NEWEST]


def test_static_endpoints_are_merged_and_pools_retained(tmp_path: Path) -> None:
    applier = make_applier(None)
    table = {"api": {"v2": ("127.0.0.1:7002",)}, "web": {"v1": ("127.0.0.1:7003",)}}
    assert apply(applier, compile_policy(tmp_path), endpoints=table).ok
    endpoints = applier.deps.endpoints
    assert endpoints.get("api", "v1") == ("127.0.0.1:7001",)
    assert endpoints.get("api", "v2") == ("127.0.0.1:7002",)
    assert endpoints.get("api") == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert endpoints.get("nope", None) == ()
    in_use = frozenset({"127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", APP})
    assert applier.deps.pool.retained[-1] == in_use  # type: ignore[attr-defined]
    assert applier.deps.state.retained[-1] == (frozenset({"web", "api"}), in_use)  # type: ignore[attr-defined]


def test_the_same_digest_is_a_no_op(tmp_path: Path) -> None:
    applier = make_applier(tmp_path / "state")
    data = compile_policy(tmp_path)
    apply(applier, data)
    table = applier.current
    result = apply(applier, data)
    assert result.ok and not result.changed
    assert applier.current is table


def test_the_same_digest_with_new_endpoints_updates_only_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    applier = make_applier(state)
    data = compile_policy(tmp_path)
    apply(applier, data, endpoints={"api": {"v2": ("127.0.0.1:7002",)}})
    table = applier.current
    result = apply(applier, data, endpoints={"api": {"v2": ("127.0.0.1:7009",)}})
    assert result.ok and result.changed and applier.current is table
    assert applier.deps.endpoints.get("api", "v2") == ("127.0.0.1:7009",)
    lkg = load_last_known_good(state)
    assert lkg is not None and dict(lkg.endpoints) == {"api": {"v2": ("127.0.0.1:7009",)}}
    bad = apply(applier, data, endpoints={"nope": {"v1": ("127.0.0.1:1",)}}, endpoints_source="eps.json")
    assert not bad.ok and bad.error is not None and "service 'nope' is not declared" in bad.error
    assert applier.deps.endpoints.get("api", "v2") == ("127.0.0.1:7009",)


def test_an_in_flight_request_keeps_the_table_it_started_with(tmp_path: Path) -> None:
    applier = make_applier(None)
    apply(applier, compile_policy(tmp_path, "v1"))
    old = applier.current
    assert apply(applier, compile_policy(tmp_path, "v2")).changed
    assert backend_of(applier) == "v2"
    assert old is not None and old is not applier.current

    async def go() -> Response:
        return await old.outbound(Request("GET", "/", None, [], EMPTY, service="api"))

    assert dict(asyncio.run(go()).headers)["x-backend"] == "v1"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda data: b"{not json", "bundle rejected: bundle is not valid JSON"),
        (lambda data: data.replace(b'"kind":"Bundle"', b'"kind":"Bundle" '), "not canonical"),
        (
            lambda data: with_spec(data, request_tests=(RequestTest(name="wrong", service="api", backends={"v2": 100}),)),
            'golden requests failed against the new route table: request_test "wrong": expected backends {"v2": 100}',
        ),
        (
            lambda data: data.replace(b'"backends":{"v1":100}', b'"backends":{"v9":100}'),
            "validation: route/api/0: backends names version 'v9'",
        ),
    ],
    ids=["not-json", "not-canonical", "golden-failing", "unknown-version"],
)
def test_a_bad_bundle_keeps_the_old_table(tmp_path: Path, mutate: Callable[[bytes], bytes], reason: str) -> None:
    applier = make_applier(tmp_path / "state")
    good = compile_policy(tmp_path)
    apply(applier, good)
    table = applier.current
    bad = mutate(good)
    if b'"v9"' in bad:  # keep it canonical, so only the runtime's validation refuses it
        bad = encode_bundle(msgspec.json.decode(bad, type=Bundle))[0]
    result = apply(applier, bad)
    assert not result.ok and not result.changed
    assert result.error is not None and reason in result.error
    assert applier.current is table
    assert applier.last_error is not None and applier.last_error.error == result.error
    assert applier.last_error.digest == digest_of(bad)
    lkg = load_last_known_good(tmp_path / "state")
    assert lkg is not None and lkg.digest == digest_of(good)
    # A later good apply clears the error.
    assert apply(applier, good).ok and applier.last_error is None


def test_expected_digest_must_match(tmp_path: Path) -> None:
    applier = make_applier(None)
    result = apply(applier, compile_policy(tmp_path), expected_digest="sha256:" + "0" * 64, origin="control-plane")
    assert not result.ok and result.error is not None and "digest mismatch" in result.error
    assert applier.current is None


def test_endpoints_given_with_a_bundle_must_name_its_services(tmp_path: Path) -> None:
    applier = make_applier(None)
    result = apply(applier, compile_policy(tmp_path), endpoints={"nope": {"v1": ("127.0.0.1:1",)}},
                   endpoints_source="eps.json")
    assert result.error == "eps.json: service 'nope' is not declared by the bundle (services: api, web)"
    result = apply(applier, compile_policy(tmp_path), endpoints={"api": {"v7": ("127.0.0.1:1",)}},
                   endpoints_source="eps.json")
    assert result.error == "eps.json: service 'api' has no version 'v7' (declared: v1, v2)"


def test_last_known_good_round_trip_and_corruption(tmp_path: Path) -> None:
    state = tmp_path / "state"
    applier = make_applier(state)
    data = compile_policy(tmp_path)
    assert apply(applier, data, endpoints={"api": {"v2": ("127.0.0.1:7002",)}}).ok
    lkg = load_last_known_good(state)
    assert lkg is not None and dict(lkg.endpoints) == {"api": {"v2": ("127.0.0.1:7002",)}}

    # Restart: a fresh applier applies it as last-known-good, without rewriting it.
    before = (state / NEWEST).read_bytes()
    fresh = make_applier(state)
    result = apply(fresh, lkg.data, expected_digest=lkg.digest, origin="last-known-good", endpoints=lkg.endpoints)
    assert result.ok and fresh.applied is not None and fresh.applied.origin == "last-known-good"
    assert (state / NEWEST).read_bytes() == before

    bundle_file = next((state / "bundles").iterdir())
    bundle_file.write_bytes(data.replace(b"v1", b"v3"))
    with pytest.raises(LastKnownGoodError, match="corrupt: its bytes hash to"):
        load_last_known_good(state)
    (state / NEWEST).write_text("{")
    with pytest.raises(LastKnownGoodError, match="last-known-good.a.json: corrupt"):
        load_last_known_good(state)
    assert load_last_known_good(tmp_path / "empty") is None


def test_two_generations_are_kept_on_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    applier = make_applier(state)
    v1, v2 = compile_policy(tmp_path, "v1"), compile_policy(tmp_path, "v2")
    apply(applier, v1)
    apply(applier, v2)
    names = {digest_of(d).replace(":", "-") + ".json" for d in (v1, v2)}
    assert {p.name for p in (state / "bundles").iterdir()} == names
    metas = [json.loads((state / name).read_text()) for name in GENERATION_FILES]
    assert [(m["generation"], m["digest"]) for m in metas] == [(1, digest_of(v1)), (2, digest_of(v2))]
    # A third bundle takes the oldest slot; the bundle only it named goes.
    v3 = with_spec(v1, request_tests=())
    apply(applier, v3)
    assert {p.name for p in (state / "bundles").iterdir()} == {
        digest_of(d).replace(":", "-") + ".json" for d in (v2, v3)
    }
    lkg = load_last_known_good(state)
    assert lkg is not None and (lkg.digest, lkg.generation) == (digest_of(v3), 3)
    assert not [p for p in state.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[]", 'expected an object {"service": {"version": ["host:port", ...]}}'),
        (b'{"api": ["127.0.0.1:1"]}', "service 'api': expected an object"),
        (b'{"api": {"v1": "127.0.0.1:1"}}', 'api/v1: expected a list of "host:port" strings'),
        (b'{"api": {"v1": ["localhost"]}}', "api/v1: 'localhost' is not HOST:PORT"),
        (b'{"api": {"v1": ["127.0.0.1:0"]}}', "api/v1: '127.0.0.1:0': port 0 is not a number from 1 to 65535"),
        (b'{"api": {"v1": ["::1:80"]}}', "write an IPv6 host in brackets"),
        (b"{", "eps.json: not valid JSON"),
    ],
)
def test_endpoint_files_are_checked(text: bytes, message: str) -> None:
    with pytest.raises(EndpointsError) as info:
        parse_endpoints(text, "eps.json")
    assert message in str(info.value)
    assert str(info.value).startswith("eps.json")


def test_endpoint_files_parse() -> None:
    table = parse_endpoints(b'{"api": {"v1": ["127.0.0.1:1", "[::1]:2", "127.0.0.1:1"]}}', "eps.json")
    assert table == {"api": {"v1": ("127.0.0.1:1", "[::1]:2")}}
    assert parse_address("[::1]:0", allow_port_zero=True) == ("::1", 0)


def test_a_bug_while_building_is_a_rejection_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    applier = make_applier(None)
    apply(applier, compile_policy(tmp_path, "v1"))
    table = applier.current

    def broken(service: Any, rule: Any, deps: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(table_module, "build_outbound", broken)
    result = apply(applier, compile_policy(tmp_path, "v2"))
    assert not result.ok and result.error is not None
    assert result.error.startswith("route table could not be built (a proxy bug; details in its log): AttributeError")
    assert applier.current is table

