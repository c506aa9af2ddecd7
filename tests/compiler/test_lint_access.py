"""SM414 (relaxed mTLS) and SM415 (wide-open access), on Specs built in Python and on
real Starlark policy trees; and explain's authorization block for the same policies:
the allow a finding points at is the rule explain names when it admits a request."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from starmesh.bundle.decide import DecisionTable, RequestInfo
from starmesh.bundle.spec import Allow, Authorization, MeshConfig, Service, SourceLocation, Spec
from starmesh.compiler.compile import CompileResult, compile_tree
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.lint import lint_spec


def located(spec: Spec) -> Spec:
    """`spec` with every mesh, service and authorization object on its own line."""
    keys = ["mesh", *(f"service/{name}" for name in spec.services)]
    for name, authorization in spec.authorization.items():
        keys.append(f"authorization/{name}")
        keys += [f"authorization/{name}/{i}" for i in range(len(authorization.rules))]
    source_map = {key: SourceLocation(file="mesh.star", line=n, col=1) for n, key in enumerate(keys, 1)}
    return msgspec.structs.replace(spec, source_map=source_map)


def findings(spec: Spec, code: str) -> list[tuple[str, Finding]]:
    """(source-map key, finding) of every `code` finding, in lint order."""
    located_spec = located(spec)
    by_line = {loc.line: key for key, loc in located_spec.source_map.items()}
    return [(by_line[f.line], f) for f in lint_spec(located_spec) if f.code == code]


def mtls_spec(mesh_mtls: str, **services: str | None) -> Spec:
    return Spec(
        mesh=MeshConfig(name="demo", mtls=mesh_mtls),  # type: ignore[arg-type]
        services={name: Service(mtls=mode) for name, mode in services.items()},  # type: ignore[arg-type]
    )


def authz_spec(*rules: Allow, mode: str = "enforce") -> Spec:
    return Spec(
        mesh=MeshConfig(name="demo"),
        services={"front": Service(), "back": Service()},
        authorization={"back": Authorization(rules=rules, mode=mode)},  # type: ignore[arg-type]
    )


# --- SM414: relaxed mTLS ------------------------------------------------------------------


def test_a_strict_mesh_with_no_overrides_is_not_reported() -> None:
    assert findings(mtls_spec("strict", a=None, b="strict"), "SM414") == []


@pytest.mark.parametrize(
    ("mesh_mtls", "own", "consequence"),
    [
        ("strict", "permissive", "plaintext calls are accepted too, unencrypted and without proven caller identity"),
        ("strict", "disable", "only plaintext is accepted: traffic is unencrypted and no caller proves its identity"),
        ("permissive", "disable", "only plaintext is accepted"),
    ],
)
def test_a_service_weaker_than_the_mesh_is_reported_at_the_service(mesh_mtls: str, own: str, consequence: str) -> None:
    spec = mtls_spec(mesh_mtls, edge=own, inner=None)
    reported = dict(findings(spec, "SM414"))
    finding = reported["service/edge"]
    assert finding.severity == "warning"
    assert f'"edge" relaxes mTLS to "{own}" (the mesh\'s is "{mesh_mtls}")' in finding.message
    assert consequence in finding.message
    assert finding.hint is not None and 'mtls = "strict" on "edge"' in finding.hint
    # Under a strict mesh the inheriting service is fine; under a permissive one it is
    # reported once, at mesh(...), and "edge" is not named there again.
    if mesh_mtls == "strict":
        assert set(reported) == {"service/edge"}
    else:
        assert set(reported) == {"mesh", "service/edge"}
        assert '"inner"' in reported["mesh"].message and '"edge"' not in reported["mesh"].message


def test_a_stronger_or_equal_override_is_not_reported_at_the_service() -> None:
    spec = mtls_spec("permissive", hardened="strict", same="permissive", inherits=None)
    reported = findings(spec, "SM414")
    assert [key for key, _ in reported] == ["mesh"]
    message = reported[0][1].message
    assert message.startswith('mesh mTLS is "permissive", leaving 2 services without proven caller identity; ')
    assert '"inherits", "same"' in message and '"hardened"' not in message


def test_a_relaxed_mesh_names_each_mode_and_says_what_it_means() -> None:
    spec = mtls_spec("disable", a=None, b="permissive", c=None, d="strict")
    [(key, finding)] = findings(spec, "SM414")
    assert key == "mesh"
    assert finding.message == (
        'mesh mTLS is "disable", leaving 3 services without proven caller identity; '
        '"a", "c": only plaintext is accepted: traffic is unencrypted and no caller proves its identity; '
        '"b": plaintext calls are accepted too, unencrypted and without proven caller identity'
    )
    assert finding.hint is not None and 'mesh(mtls = "strict")' in finding.hint


def test_a_relaxed_mesh_whose_services_are_all_strict_is_not_reported() -> None:
    assert findings(mtls_spec("disable", a="strict", b="strict"), "SM414") == []


def test_the_mesh_finding_names_a_bounded_number_of_services() -> None:
    spec = mtls_spec("permissive", **{f"s{i:03}": None for i in range(300)})
    [(_, finding)] = findings(spec, "SM414")
    assert "leaving 300 services" in finding.message
    assert '"s000", "s001", "s002", "s003", "s004" and 295 more:' in finding.message
    assert len(finding.message) < 300


# --- SM415: wide-open access --------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "what"),
    [
        (Allow(), "names no sources, methods or paths"),
        (Allow(paths=("/*",)), 'admits path "/*" (every path) and names no sources or methods'),
        (Allow(paths=("/health", "/*")), 'admits path "/*" (every path)'),
    ],
)
def test_an_allow_that_admits_everything_is_reported(allow: Allow, what: str) -> None:
    spec = authz_spec(Allow(sources=("front",)), allow)
    [(key, finding)] = findings(spec, "SM415")
    assert key == "authorization/back/1"
    assert finding.severity == "warning"
    assert f'allow on "back" {what}' in finding.message
    assert 'admits every caller, identified or not, for every method and path, so the authorization on "back" denies nothing' in (
        finding.message
    )
    assert finding.hint is not None and "sources = [...]" in finding.hint and "methods or paths" in finding.hint


@pytest.mark.parametrize(
    "allow",
    [
        Allow(sources=("front",)),
        Allow(methods=("GET",)),
        Allow(paths=("/api/*",)),
        Allow(methods=("GET",), paths=("/*",)),
        Allow(sources=("front",), paths=("/*",)),
    ],
)
def test_an_allow_that_narrows_anything_is_not_reported(allow: Allow) -> None:
    assert findings(authz_spec(allow), "SM415") == []


def test_audit_mode_is_left_to_sm407() -> None:
    spec = authz_spec(Allow(), mode="audit")
    assert findings(spec, "SM415") == []
    assert [key for key, _ in findings(spec, "SM407")] == ["authorization/back"]


# --- on Starlark trees, with explain --------------------------------------------------------

EDGE_POLICY = """\
mesh(name = "shop", mtls = "strict")

service(name = "web", mtls = "permissive")
service(name = "cart")

authorization("web", rules = [
    allow(methods = ["GET"], paths = ["/", "/static/*"]),
    allow(paths = ["/*"]),
])
authorization("cart", rules = [
    allow(sources = ["web"], methods = ["GET", "POST"], paths = ["/cart/*"]),
])
"""


def compile_policy(tmp_path: Path, text: str) -> CompileResult:
    (tmp_path / "mesh.star").write_text(text, encoding="utf-8")
    result = compile_tree(tmp_path)
    assert result.bundle is not None, [f.concise() for f in result.findings]
    return result


def line_of(text: str, needle: str) -> int:
    [line] = [n for n, content in enumerate(text.splitlines(), 1) if needle in content]
    return line


def test_findings_point_at_the_policy_lines(tmp_path: Path) -> None:
    result = compile_policy(tmp_path, EDGE_POLICY)
    reported = [(f.code, f.line) for f in result.findings]
    assert reported == [
        ("SM414", line_of(EDGE_POLICY, 'service(name = "web"')),
        ("SM415", line_of(EDGE_POLICY, 'allow(paths = ["/*"])')),
    ], [f.concise() for f in result.findings]


def test_explain_names_the_wide_open_allow_that_lint_reported(tmp_path: Path) -> None:
    result = compile_policy(tmp_path, EDGE_POLICY)
    assert result.bundle is not None
    [wide_open] = [f for f in result.findings if f.code == "SM415"]
    table = DecisionTable.build(result.bundle.spec)
    explained = table.explain(RequestInfo(service="web", method="DELETE", path="/admin")).to_json()
    assert explained["authorization"] == {
        "allowed": True,
        "mode": "enforce",
        "rule": {"index": 1, "file": "mesh.star", "line": wide_open.line},
        "would_deny": False,
        "why": f"allow[1] (mesh.star:{wide_open.line}) admits path /admin (under /*)",
    }
    assert explained["response"] is None


def test_explain_of_a_denied_request_names_no_rule_and_the_mode(tmp_path: Path) -> None:
    result = compile_policy(tmp_path, EDGE_POLICY)
    assert result.bundle is not None
    table = DecisionTable.build(result.bundle.spec)
    denied = table.explain(RequestInfo(service="cart", method="DELETE", path="/cart/1", source="web")).to_json()
    cart_allow = line_of(EDGE_POLICY, 'allow(sources = ["web"]')
    assert denied["authorization"] == {
        "allowed": False,
        "mode": "enforce",
        "rule": None,
        "would_deny": False,
        "why": f"no allow admits the request: allow[0] (mesh.star:{cart_allow}) needs method GET or POST "
        "(the request is DELETE)",
    }
    assert denied["response"] == {"status": 403, "reason": "denied"}
    unidentified = table.explain(RequestInfo(service="cart", method="GET", path="/cart/1")).to_json()
    assert unidentified["authorization"] == {
        "allowed": False,
        "mode": "enforce",
        "rule": None,
        "would_deny": False,
        "why": f"no allow admits the request: allow[0] (mesh.star:{cart_allow}) needs source web "
        "(the request has no proven source)",
    }
    admitted = table.explain(RequestInfo(service="cart", method="GET", path="/cart/1", source="web")).to_json()
    assert admitted["authorization"] == {
        "allowed": True,
        "mode": "enforce",
        "rule": {"index": 0, "file": "mesh.star", "line": cart_allow},
        "would_deny": False,
        "why": f"allow[0] (mesh.star:{cart_allow}) admits source web, method GET, path /cart/1 (under /cart/*)",
    }


def test_explain_in_audit_mode_allows_and_names_no_rule_for_a_would_be_denial(tmp_path: Path) -> None:
    text = EDGE_POLICY.replace('"/cart/*"]),\n])', '"/cart/*"]),\n], mode = "audit")')
    assert text != EDGE_POLICY
    result = compile_policy(tmp_path, text)
    assert result.bundle is not None
    assert "SM407" in {f.code for f in result.findings}
    table = DecisionTable.build(result.bundle.spec)
    audited = table.explain(RequestInfo(service="cart", method="DELETE", path="/cart/1", source="web")).to_json()
    assert {k: audited["authorization"][k] for k in ("allowed", "mode", "rule", "would_deny")} == {
        "allowed": True, "mode": "audit", "rule": None, "would_deny": True,
    }
    assert audited["authorization"]["why"].startswith("audit mode lets it through, logged as would_deny")
    assert audited["response"] is None
