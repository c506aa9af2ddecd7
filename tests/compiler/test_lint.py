"""lint_spec on Specs built directly in Python: references, shadowing, resilience,
security and traffic rules, locations and ordering. (Call-graph rules: test_lint_callgraph.py.)"""

from __future__ import annotations

import msgspec
import pytest

from starmesh.bundle.spec import (
    Allow,
    Authorization,
    Fault,
    Match,
    MeshConfig,
    Mirror,
    RequestTest,
    Retries,
    Rule,
    Service,
    SourceLocation,
    Spec,
    StringMatch,
)
from starmesh.compiler.codes import CODES
from starmesh.compiler.lint import lint_spec
from starmesh.compiler.rules import RULES


def located(spec: Spec, *, skip: tuple[str, ...] = ()) -> Spec:
    """`spec` with a source map: every object on its own line of mesh.star, in key order."""
    keys = ["mesh"]
    keys += [f"service/{name}" for name in spec.services]
    for name, rules in spec.routes.items():
        keys.append(f"http_route/{name}")
        keys += [f"route/{name}/{i}" for i in range(len(rules))]
    for name, authorization in spec.authorization.items():
        keys.append(f"authorization/{name}")
        keys += [f"authorization/{name}/{i}" for i in range(len(authorization.rules))]
    keys += [f"request_test/{t.name}" for t in spec.request_tests]
    lines = {key: n for n, key in enumerate(keys, 1) if key not in skip}
    source_map = {key: SourceLocation(file="mesh.star", line=n, col=1) for key, n in lines.items()}
    return msgspec.structs.replace(spec, source_map=source_map)


def found(spec: Spec) -> list[tuple[str, str]]:
    """(code, source-map key) of every finding, in lint order."""
    by_line = {loc.line: key for key, loc in spec.source_map.items()}
    return [(f.code, by_line.get(f.line, f"{f.file}:{f.line}")) for f in lint_spec(spec)]


def codes(spec: Spec) -> set[str]:
    return {code for code, _ in found(spec)}


def mesh(**kwargs: object) -> MeshConfig:
    return MeshConfig(name="demo", **kwargs)  # type: ignore[arg-type]


def make(**kwargs: object) -> Spec:
    return located(Spec(mesh=mesh(), **kwargs))  # type: ignore[arg-type]


V12 = Service(versions=("v1", "v2"))


# --- the registry and its codes -------------------------------------------------------


def test_every_rule_code_is_declared_and_every_sm4xx_code_has_a_rule() -> None:
    assert set(RULES) <= set(CODES)
    spec_level = {c for c in CODES if c.startswith("SM4") or c in ("SM303", "SM304")}
    assert spec_level == set(RULES)


def test_a_clean_spec_has_no_findings() -> None:
    spec = make(
        services={"reviews": Service(versions=("v1", "v2"), timeout_ms=2000, retries=Retries(per_try_timeout_ms=500))},
        routes={
            "reviews": (Rule(match=(Match(path_prefix="/api/"),), backends={"v2": 100}), Rule(backends={"v1": 100}))
        },
        authorization={"reviews": Authorization(rules=(Allow(methods=("GET",)),))},
        request_tests=(RequestTest(name="t", service="reviews", backends={"v1": 100}),),
    )
    assert found(spec) == []


# --- locations and ordering -----------------------------------------------------------


def test_findings_carry_the_source_location_and_severity() -> None:
    spec = make(services={"a": Service()}, routes={"ghost": (Rule(),)})
    [finding] = lint_spec(spec)
    assert (finding.file, finding.line, finding.col) == ("mesh.star", spec.source_map["http_route/ghost"].line, 1)
    assert finding.code == "SM303" and finding.severity == "error"
    assert "ghost" in finding.message and finding.hint


def test_missing_rule_location_falls_back_to_its_http_route_then_service_then_mesh() -> None:
    spec = Spec(
        mesh=mesh(),
        services={"svc": V12},
        routes={"svc": (Rule(), Rule(backends={"v1": 100}))},
    )
    full = located(spec)
    assert found(full) == [("SM401", "route/svc/1")]
    assert found(located(spec, skip=("route/svc/1",))) == [("SM401", "http_route/svc")]
    assert found(located(spec, skip=("route/svc/1", "http_route/svc"))) == [("SM401", "service/svc")]
    assert found(located(spec, skip=("route/svc/1", "http_route/svc", "service/svc"))) == [("SM401", "mesh")]


def test_no_source_map_at_all_gives_policy_1_1() -> None:
    spec = Spec(mesh=mesh(), routes={"ghost": (Rule(),)})
    [finding] = lint_spec(spec)
    assert (finding.file, finding.line, finding.col) == ("<policy>", 1, 1)


def test_findings_are_sorted_by_location_then_code_and_deterministic() -> None:
    spec = make(
        services={"b": Service(retries=Retries()), "a": Service(retries=Retries(attempts=3))},
        authorization={"a": Authorization(mode="audit", rules=(Allow(sources=("ghost",)),))},
    )
    first = lint_spec(spec)
    assert first == lint_spec(spec)
    assert [(f.file, f.line, f.col, f.code) for f in first] == sorted((f.file, f.line, f.col, f.code) for f in first)
    assert len(first) == 4  # SM402 on a and b, SM407, SM303


# --- SM303 / SM304 --------------------------------------------------------------------


def test_sm303_unknown_services_everywhere_they_can_be_named() -> None:
    spec = make(
        services={"reviews": Service()},
        routes={"reveiws": (Rule(),)},
        authorization={
            "ratings": Authorization(rules=(Allow(methods=("GET",)),)),
            "reviews": Authorization(rules=(Allow(sources=("productpage",)),)),
        },
        request_tests=(
            RequestTest(name="t1", service="detail"),
            RequestTest(name="t2", service="reviews", source="frontend"),
        ),
    )
    assert sorted(found(spec)) == [
        ("SM303", "authorization/ratings"),
        ("SM303", "authorization/reviews/0"),
        ("SM303", "http_route/reveiws"),
        ("SM303", "request_test/t1"),
        ("SM303", "request_test/t2"),
    ]
    typo = next(f for f in lint_spec(spec) if "reveiws" in f.message)
    assert typo.hint is not None and 'did you mean "reviews"' in typo.hint


def test_sm303_passes_when_every_name_is_declared() -> None:
    spec = make(
        services={"reviews": Service(), "productpage": Service()},
        authorization={"reviews": Authorization(rules=(Allow(sources=("productpage",)),))},
        request_tests=(RequestTest(name="t", service="reviews", source="productpage"),),
    )
    assert "SM303" not in codes(spec)


def test_sm304_unknown_versions() -> None:
    spec = make(
        services={"reviews": Service(versions=("v1", "v2"), endpoints={"v3": ("127.0.0.1:9000",)})},
        routes={"reviews": (Rule(backends={"v1": 50, "v9": 50}, mirror=Mirror(version="v4")),)},
        request_tests=(RequestTest(name="t", service="reviews", backends={"v7": 100}),),
    )
    assert sorted(x for x in found(spec) if x[0] == "SM304") == [
        ("SM304", "request_test/t"),
        ("SM304", "route/reviews/0"),
        ("SM304", "route/reviews/0"),
        ("SM304", "service/reviews"),
    ]
    assert all(f.severity == "error" for f in lint_spec(spec) if f.code == "SM304")


def test_sm304_passes_and_routes_of_unknown_services_are_not_double_reported() -> None:
    spec = make(
        services={"reviews": V12},
        routes={
            "reviews": (Rule(backends={"v1": 90, "v2": 10}, mirror=Mirror(version="v2", percent=0)),),
            "ghost": (Rule(backends={"v1": 100}),),
        },
    )
    assert "SM304" not in codes(spec)
    assert ("SM303", "http_route/ghost") in found(spec)


# --- SM401 / SM411 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "catch_all",
    [
        Rule(),
        Rule(match=(Match(),)),
        Rule(match=(Match(path_prefix="/"),)),
        Rule(match=(Match(path_regex=".*"),)),
        Rule(match=(Match(path_exact="/x"), Match())),
    ],
)
def test_sm401_everything_after_a_catch_all_is_shadowed(catch_all: Rule) -> None:
    spec = make(
        services={"svc": V12},
        routes={
            "svc": (
                Rule(match=(Match(path_exact="/a"),), backends={"v2": 100}),
                catch_all,
                Rule(match=(Match(path_exact="/b"),)),
                Rule(),
            )
        },
    )
    assert found(spec) == [("SM401", "route/svc/2"), ("SM401", "route/svc/3")]
    assert "rules[1]" in lint_spec(spec)[0].message


@pytest.mark.parametrize(
    "narrow",
    [
        Match(path_prefix="/api"),
        Match(methods=("GET",)),
        Match(headers={"x": StringMatch(kind="present")}),
        Match(query={"q": StringMatch(kind="exact", value="1")}),
        Match(path_regex="^/api/.*$"),
    ],
)
def test_sm401_passes_when_the_catch_all_is_last(narrow: Match) -> None:
    rules = (Rule(match=(narrow,), backends={"v2": 100}), Rule(backends={"v1": 100}))
    spec = make(services={"svc": V12}, routes={"svc": rules})
    assert found(spec) == []


def test_sm411_rule_covered_by_an_earlier_narrower_rule() -> None:
    jason = {"end-user": StringMatch(kind="exact", value="jason")}
    spec = make(
        services={"svc": V12},
        routes={
            "svc": (
                Rule(match=(Match(path_prefix="/api/"),), backends={"v1": 100}),
                Rule(match=(Match(path_exact="/api/users", methods=("GET",)),), backends={"v2": 100}),
                Rule(match=(Match(headers={"End-User": StringMatch(kind="present")}),), backends={"v2": 100}),
                Rule(
                    match=(Match(headers=jason, methods=("POST",)), Match(path_prefix="/api/x")),
                    backends={"v2": 100},
                ),
                Rule(match=(Match(path_prefix="/apix"),), backends={"v2": 100}),
                Rule(backends={"v1": 100}),
            )
        },
    )
    assert found(spec) == [("SM411", "route/svc/1"), ("SM411", "route/svc/3")]
    message = lint_spec(spec)[1].message
    assert "rules[2] and rules[0]" in message


def test_sm411_prefix_boundaries_and_different_values_are_not_shadowed() -> None:
    spec = make(
        services={"svc": V12},
        routes={
            "svc": (
                Rule(match=(Match(path_prefix="/api"),), backends={"v1": 100}),
                Rule(match=(Match(path_prefix="/apix"),), backends={"v2": 100}),
                Rule(match=(Match(headers={"u": StringMatch(kind="exact", value="a")}),), backends={"v2": 100}),
                Rule(match=(Match(headers={"u": StringMatch(kind="exact", value="b")}),), backends={"v2": 100}),
                Rule(match=(Match(methods=("GET",)),), backends={"v2": 100}),
                Rule(match=(Match(methods=("GET", "POST")),), backends={"v2": 100}),
            )
        },
    )
    assert "SM411" not in codes(spec)


# --- SM402 / SM408 ------------------------------------------------------------------


def test_sm402_retries_without_any_timeout() -> None:
    spec = make(
        services={
            "plain": Service(retries=Retries()),
            "routed": Service(versions=("v1", "v2"), retries=Retries()),
            "ruled": Service(timeout_ms=1000),
        },
        routes={
            "routed": (
                Rule(match=(Match(path_prefix="/a"),), timeout_ms=500),
                Rule(),
                Rule(match=(Match(path_prefix="/b"),)),
            ),
            "ruled": (Rule(retries=Retries(attempts=3)),),
        },
    )
    # rules[1] and rules[2] inherit the service's retries without a timeout: reported once,
    # on the service; rules[0] has its own timeout; 'ruled' has the service's timeout.
    assert found(spec) == [("SM402", "service/plain"), ("SM402", "service/routed"), ("SM401", "route/routed/2")]
    hinted = next(f for f in lint_spec(spec) if f.code == "SM402")
    assert hinted.hint is not None and "per_try_timeout" in hinted.hint


def test_sm402_rule_level_retries_reported_on_the_rule() -> None:
    spec = make(services={"svc": Service()}, routes={"svc": (Rule(retries=Retries(attempts=1)),)})
    assert found(spec) == [("SM402", "route/svc/0")]


def test_sm402_passes_with_a_per_try_timeout_a_timeout_or_zero_attempts() -> None:
    spec = make(
        services={
            "a": Service(retries=Retries(per_try_timeout_ms=100)),
            "b": Service(retries=Retries(), timeout_ms=1000),
            "c": Service(retries=Retries(attempts=0)),
            "d": Service(retries=Retries()),
        },
        routes={"d": (Rule(timeout_ms=300),)},
    )
    assert "SM402" not in codes(spec)


def test_sm408_per_try_not_shorter_than_timeout() -> None:
    spec = make(
        services={
            "a": Service(timeout_ms=1000, retries=Retries(per_try_timeout_ms=1000)),
            "b": Service(retries=Retries(per_try_timeout_ms=2000)),
        },
        routes={"b": (Rule(timeout_ms=1500),)},
    )
    assert found(spec) == [("SM408", "service/a"), ("SM408", "route/b/0")]
    assert "333ms" in (lint_spec(spec)[0].hint or "")


def test_sm408_passes_when_per_try_is_shorter() -> None:
    spec = make(services={"a": Service(timeout_ms=1000, retries=Retries(per_try_timeout_ms=300))})
    assert found(spec) == []


# --- SM403 / SM407 / SM412 --------------------------------------------------------------


def _authz_spec(mesh_mtls: str, service_mtls: str | None) -> Spec:
    return located(
        Spec(
            mesh=mesh(mtls=mesh_mtls),
            services={"front": Service(), "back": Service(mtls=service_mtls)},  # type: ignore[arg-type]
            authorization={"back": Authorization(rules=(Allow(methods=("GET",)), Allow(sources=("front",))))},
        )
    )


@pytest.mark.parametrize(
    ("mesh_mtls", "service_mtls", "word"),
    [
        ("disable", None, "admits nobody"),
        ("strict", "disable", "admits nobody"),
        ("permissive", None, "only callers using mTLS"),
    ],
)
def test_sm403_sources_without_mtls(mesh_mtls: str, service_mtls: str | None, word: str) -> None:
    spec = _authz_spec(mesh_mtls, service_mtls)
    assert [f for f in found(spec) if f[0] != "SM414"] == [("SM403", "authorization/back/1")]
    [finding] = [f for f in lint_spec(spec) if f.code == "SM403"]
    assert word in finding.message


@pytest.mark.parametrize(("mesh_mtls", "service_mtls"), [("strict", None), ("disable", "strict")])
def test_sm403_passes_under_strict(mesh_mtls: str, service_mtls: str | None) -> None:
    assert "SM403" not in codes(_authz_spec(mesh_mtls, service_mtls))


def test_sm407_audit_mode() -> None:
    audit = make(services={"a": Service()}, authorization={"a": Authorization(mode="audit", rules=(Allow(),))})
    enforce = make(services={"a": Service()}, authorization={"a": Authorization(rules=(Allow(methods=("GET",)),))})
    assert found(audit) == [("SM407", "authorization/a")]
    assert found(enforce) == []


def test_sm413_authorization_that_admits_nothing() -> None:
    spec = make(
        services={"a": Service(), "b": Service()},
        authorization={
            "a": Authorization(rules=()),
            "b": Authorization(rules=(Allow(sources=()), Allow(methods=("GET",), paths=()), Allow(methods=("GET",)))),
        },
    )
    assert found(spec) == [("SM412", "authorization/a"), ("SM412", "authorization/b/0"), ("SM412", "authorization/b/1")]
    audit = make(services={"a": Service()}, authorization={"a": Authorization(mode="audit", rules=())})
    assert "SM412" not in codes(audit)


# --- SM404 / SM409 / SM410 / SM413 ------------------------------------------------------


def test_sm404_mirror_to_a_version_with_live_traffic() -> None:
    spec = make(
        services={"svc": V12, "one": Service()},
        routes={
            "svc": (
                Rule(match=(Match(path_prefix="/a/"),), backends={"v1": 100}, mirror=Mirror(version="v1")),
                Rule(backends={"v1": 90, "v2": 10}, mirror=Mirror(version="v2", percent=5)),
            ),
            "one": (Rule(mirror=Mirror(version="v1")),),
        },
    )
    assert found(spec) == [("SM404", "route/svc/0"), ("SM404", "route/svc/1"), ("SM404", "route/one/0")]


def test_sm404_passes_for_a_shadow_version() -> None:
    spec = make(
        services={"svc": V12},
        routes={"svc": (Rule(backends={"v1": 100, "v2": 0}, mirror=Mirror(version="v2", percent=10)),)},
    )
    assert found(spec) == []


def test_sm409_dead_version() -> None:
    spec = make(
        services={"svc": Service(versions=("v1", "v2", "v3"))},
        routes={"svc": (Rule(match=(Match(path_prefix="/a/"),), backends={"v2": 100}), Rule(backends={"v1": 100}))},
    )
    assert found(spec) == [("SM409", "service/svc")]
    assert '"v3"' in lint_spec(spec)[0].message


@pytest.mark.parametrize(
    "rules",
    [
        (Rule(match=(Match(path_prefix="/a/"),), backends={"v2": 100}), Rule()),  # a rule uses every version
        (Rule(backends={"v1": 100, "v2": 0}, mirror=Mirror(version="v3", percent=1)),),  # drained / mirrored
    ],
)
def test_sm409_is_conservative(rules: tuple[Rule, ...]) -> None:
    spec = make(services={"svc": Service(versions=("v1", "v2", "v3"))}, routes={"svc": rules})
    assert "SM409" not in codes(spec)
    assert "SM409" not in codes(make(services={"svc": Service(versions=("v1", "v2"))}))  # no http_route


def test_sm410_fault_on_every_request() -> None:
    spec = make(
        services={"svc": Service()},
        routes={
            "svc": (
                # Behind a test user's header: a deliberate experiment, not reported.
                Rule(
                    match=(Match(headers={"end-user": StringMatch(kind="exact", value="chaos")}),),
                    fault=Fault(abort_status=503, abort_percent=100),
                ),
                Rule(match=(Match(path_prefix="/b/"),), fault=Fault(delay_ms=2000, delay_percent=10)),
                Rule(fault=Fault(delay_ms=2000, delay_percent=100, abort_status=500, abort_percent=100)),
            )
        },
    )
    assert found(spec) == [("SM410", "route/svc/2")]
    message = lint_spec(spec)[0].message
    assert "2s" in message and "aborts every request with 500" in message


def test_sm415_no_op_mirror_and_fault() -> None:
    spec = make(
        services={"svc": V12},
        routes={
            "svc": (
                Rule(
                    backends={"v1": 100, "v2": 0},
                    mirror=Mirror(version="v2", percent=0),
                    fault=Fault(delay_ms=10, abort_status=500),
                ),
            )
        },
    )
    assert found(spec) == [("SM413", "route/svc/0")] * 3
    fault = Fault(abort_status=500, abort_percent=1)
    ok = make(services={"svc": V12}, routes={"svc": (Rule(backends={"v1": 100, "v2": 0}, fault=fault),)})
    assert found(ok) == []


# --- robustness -------------------------------------------------------------------------


def test_sm409_is_silent_when_a_rule_names_an_undeclared_version() -> None:
    spec = make(services={"svc": V12}, routes={"svc": (Rule(backends={"v1": 90, "v3": 10}),)})
    assert codes(spec) == {"SM304"}


def test_dangling_references_do_not_break_the_other_rules() -> None:
    spec = make(
        services={"a": Service(timeout_ms=100, retries=Retries(attempts=1))},
        routes={"ghost": (Rule(backends={"v9": 100}, mirror=Mirror(version="v9"), retries=Retries()),)},
        authorization={
            "ghost": Authorization(mode="audit", rules=(Allow(sources=("a", "nobody")),)),
            "a": Authorization(rules=(Allow(sources=("ghost",)),)),
        },
        request_tests=(RequestTest(name="t", service="ghost", source="nobody", backends={"v9": 100}),),
    )
    assert sorted(found(spec)) == [
        ("SM303", "authorization/a/0"),
        ("SM303", "authorization/ghost"),
        ("SM303", "authorization/ghost/0"),
        ("SM303", "http_route/ghost"),
        ("SM303", "request_test/t"),
        ("SM303", "request_test/t"),
        ("SM407", "authorization/ghost"),
    ]


def test_an_empty_mesh_has_no_findings() -> None:
    assert lint_spec(Spec(mesh=mesh())) == []


def test_the_column_of_the_declaration_is_kept() -> None:
    spec = Spec(
        mesh=mesh(),
        services={"a": Service(retries=Retries())},
        source_map={"service/a": SourceLocation(file="lib/svc.star", line=7, col=5)},
    )
    [finding] = lint_spec(spec)
    assert finding.concise().startswith("lib/svc.star:7:5: SM402 ")
