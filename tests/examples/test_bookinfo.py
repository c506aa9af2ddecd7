"""examples/bookinfo/policies: lint-clean, its golden requests pass, and they can fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.spec import Spec
from starmesh.compiler.compile import CompileResult, compile_tree

POLICIES = Path(__file__).resolve().parents[2] / "examples" / "bookinfo" / "policies"


@pytest.fixture(scope="module")
def compiled() -> CompileResult:
    return compile_tree(POLICIES)


@pytest.fixture(scope="module")
def spec(compiled: CompileResult) -> Spec:
    assert compiled.bundle is not None, "\n".join(f.concise() for f in compiled.findings)
    return compiled.bundle.spec


def test_compiles_with_no_errors_and_only_the_permissive_edge_warning(compiled: CompileResult) -> None:
    # productpage is the edge (browsers have no mesh certificate), so it is "permissive",
    # and lint says so (SM414). Nothing else may be reported: no audit-mode rule (SM407).
    findings = [(f.code, f.severity, f.file) for f in compiled.findings]
    assert findings == [("SM414", "warning", "mesh.star")], [f.concise() for f in compiled.findings]
    assert compiled.bundle is not None
    assert compiled.digest is not None and compiled.digest.startswith("sha256:")


def test_uses_lib_files_and_the_shipped_library() -> None:
    mesh = (POLICIES / "mesh.star").read_text(encoding="utf-8")
    assert 'load("//lib/' in mesh
    libs = "".join(p.read_text(encoding="utf-8") for p in sorted((POLICIES / "lib").glob("*.star")))
    for module in ("traffic.star", "resilience.star", "security.star"):
        assert f'load("@starmesh//{module}"' in libs


def test_the_mesh(spec: Spec) -> None:
    assert spec.mesh.name == "bookinfo"
    assert spec.mesh.mtls == "strict"
    assert spec.mesh.trust_domain == "bookinfo.local"  # what `starmesh up` makes its CA for
    mtls = {name: service.mtls for name, service in spec.services.items()}
    assert mtls == {"productpage": "permissive", "details": None, "reviews": None, "ratings": None}
    assert spec.mesh.rollout.canary_percent == 10
    assert spec.mesh.rollout.bake_ms == 60_000
    assert set(spec.services) == {"productpage", "details", "reviews", "ratings"}
    assert spec.services["reviews"].versions == ("v1", "v2", "v3")
    assert all(s.endpoints is None for s in spec.services.values()), "endpoints come from registration"


def test_resilience(spec: Spec) -> None:
    ratings = spec.services["ratings"]
    assert ratings.rate_limit is not None and ratings.rate_limit.requests_per_second == 50
    assert ratings.retries is not None and ratings.retries.per_try_timeout_ms is not None
    assert ratings.circuit_breaker is not None and ratings.outlier_detection is not None
    # No retries on the middle hop: retries on two consecutive hops would amplify.
    assert spec.services["reviews"].retries is None
    assert spec.services["productpage"].timeout_ms is not None


def test_routing(spec: Spec) -> None:
    jason, split = spec.routes["reviews"]
    assert jason.backends == {"v2": 100}
    assert split.backends == {"v1": 80, "v2": 0, "v3": 20}
    (details,) = spec.routes["details"]
    assert details.mirror is not None and details.mirror.version == "v2"
    faults = [r.fault for r in spec.routes["ratings"] if r.fault is not None]
    assert any(f.abort_status == 503 for f in faults)
    assert any(f.delay_ms is not None for f in faults)


def test_authorization(spec: Spec) -> None:
    assert set(spec.authorization) == set(spec.services)
    # mTLS proves callers: every rule is enforced, the caller rules included.
    modes = {name: authorization.mode for name, authorization in spec.authorization.items()}
    assert modes == dict.fromkeys(spec.services, "enforce")
    for name, authorization in spec.authorization.items():
        has_sources = any(rule.sources for rule in authorization.rules)
        assert has_sources == (name != "productpage"), name  # the edge's rules need no identity
    (ratings_rule,) = spec.authorization["ratings"].rules
    assert ratings_rule.sources == ("reviews",)
    assert ratings_rule.methods == ("GET",)


def test_golden_requests_cover_routing_authorization_and_faults(spec: Spec) -> None:
    tests = spec.request_tests
    assert len(tests) >= 10
    assert any(t.backends is not None for t in tests)
    assert any(t.allowed is False and t.status == 403 for t in tests)
    assert any(t.allowed is True for t in tests)
    assert any(t.status == 429 for t in tests)
    assert any(t.headers.get("end-user") == "chaos-tester" for t in tests), "the fault rule has a golden request"


def test_a_wrong_expectation_fails_the_golden_requests(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    golden = copy / "lib" / "golden.star"
    text = golden.read_text(encoding="utf-8")
    broken = text.replace('headers = {"end-user": "jason"},\n        backends = "v2"', 'headers = {"end-user": "jason"},\n        backends = "v3"')
    assert broken != text
    golden.write_text(broken, encoding="utf-8")

    result = compile_tree(copy)

    failed = [f for f in result.findings if f.code == "SM501"]
    assert len(failed) == 1, [f.concise() for f in result.findings]
    assert failed[0].file == "lib/golden.star"
    assert result.bundle is None


def test_same_bundle_from_another_directory(tmp_path: Path, compiled: CompileResult) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(POLICIES, copy)
    assert compile_tree(copy).data == compiled.data


def test_proven_callers_are_admitted_and_the_rest_denied(spec: Spec) -> None:
    """Bookinfo's own calls (with the identity mTLS proves) pass; a wrong caller, an
    unidentified one and a write are denied; productpage's method/path rules hold for all."""
    table = DecisionTable.build(spec)
    for service, source, path in (
        ("details", "productpage", "/details/0"),
        ("reviews", "productpage", "/reviews/0"),
        ("ratings", "reviews", "/ratings/0"),
    ):
        decision = table.authorize(service, source, "GET", path)
        assert decision.allowed and not decision.would_deny, service
    for service, source, method, path in (
        ("details", "reviews", "GET", "/details/0"),
        ("ratings", "productpage", "GET", "/ratings/0"),
        ("ratings", "reviews", "POST", "/ratings/0"),
        ("reviews", None, "GET", "/reviews/0"),
    ):
        decision = table.authorize(service, source, method, path)
        assert not decision.allowed and decision.mode == "enforce", (service, source, method)
    delete = table.authorize("productpage", None, "DELETE", "/productpage")
    assert not delete.allowed and delete.mode == "enforce"
    assert table.authorize("productpage", None, "GET", "/api/v1/products/0").allowed
