"""From recorded builtin calls to a Spec (compiler/build.py): conversion, findings, source map."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starmesh.bundle.canonical import encode_canonical
from starmesh.bundle.spec import (
    AccessLog,
    Allow,
    Authorization,
    CircuitBreaker,
    Fault,
    Match,
    MeshConfig,
    Mirror,
    OutlierDetection,
    RateLimit,
    RequestTest,
    Retries,
    Rollout,
    Rule,
    Service,
    SourceLocation,
    Spec,
    StringMatch,
    Tracing,
)
from starmesh.compiler.build import BuildResult, build_spec
from starmesh.compiler.builtins import BUILTINS
from starmesh.compiler.calls import Call, Evaluation
from starmesh.compiler.diagnostics import Finding

RULES_DIR = Path(__file__).resolve().parents[2] / "docs" / "rules"
MY_CODES = ["SM201", "SM202", "SM203", "SM204", "SM205", "SM206", "SM207", "SM208", "SM209", "SM210",
            "SM301", "SM302", "SM305", "SM306"]


def loc(line: int, col: int = 1, file: str = "mesh.star") -> SourceLocation:
    return SourceLocation(file=file, line=line, col=col)


def call(builtin: str, *args: Any, line: int = 1, col: int = 1, **kwargs: Any) -> Call:
    return Call(builtin, args, kwargs, loc(line, col))


def mesh(line: int = 1) -> Call:
    return call("mesh", "demo", line=line)


def build(*declarations: Call) -> BuildResult:
    return build_spec(Evaluation(declarations, ("mesh.star",)))


def spec_of(*declarations: Call) -> Spec:
    result = build(*declarations)
    assert result.findings == [], [f.concise() for f in result.findings]
    assert result.spec is not None
    return result.spec


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


# -- conversion ------------------------------------------------------------------------


def test_defaults_everywhere() -> None:
    spec = spec_of(
        mesh(),
        call("service", "reviews", line=2),
        call("http_route", "reviews", rules=[call("rule", line=4)], line=3),
        call("authorization", "reviews", rules=[call("allow", line=6)], line=5),
        call("request_test", "t", service="reviews", line=7),
    )
    assert spec == Spec(
        mesh=MeshConfig(name="demo"),
        services={"reviews": Service()},
        routes={"reviews": (Rule(),)},
        authorization={"reviews": Authorization(rules=(Allow(),))},
        request_tests=(RequestTest(name="t", service="reviews"),),
        source_map={
            "mesh": loc(1),
            "service/reviews": loc(2),
            "http_route/reviews": loc(3),
            "route/reviews/0": loc(4),
            "authorization/reviews": loc(5),
            "authorization/reviews/0": loc(6),
            "request_test/t": loc(7),
        },
    )
    assert spec.mesh.tracing == Tracing() and spec.mesh.access_log == AccessLog() and spec.mesh.rollout == Rollout()


def test_defaults_of_nested_builtins() -> None:
    spec = spec_of(
        call(
            "mesh", name="demo",
            tracing=call("tracing"), access_log=call("access_log"), rollout=call("rollout"),
        ),
        call(
            "service", "reviews",
            retries=call("retries"), circuit_breaker=call("circuit_breaker"),
            outlier_detection=call("outlier_detection"), rate_limit=call("rate_limit", 10),
        ),
        call("http_route", "reviews", rules=[call("rule", match=[call("match")], fault=call("fault", delay="1s"),
                                                  mirror=call("mirror", "v1"))]),
    )
    assert spec.mesh == MeshConfig(name="demo")
    assert spec.services["reviews"] == Service(
        retries=Retries(), circuit_breaker=CircuitBreaker(), outlier_detection=OutlierDetection(),
        rate_limit=RateLimit(requests_per_second=10, burst=10),
    )
    assert spec.routes["reviews"] == (Rule(match=(Match(),), fault=Fault(delay_ms=1000), mirror=Mirror(version="v1")),)


def test_every_argument_given() -> None:
    spec = spec_of(
        call(
            "mesh", name="shop", trust_domain="shop.example", mtls="permissive",
            tracing=call("tracing", sample_percent=5),
            access_log=call("access_log", enabled=False, max_lines_per_second=50),
            rollout=call("rollout", canary_percent=10, bake="1m", max_failures=2),
        ),
        call(
            "service", name="reviews", port=9080, versions=["v1", "v2", "v3"], timeout="2s",
            retries=call("retries", attempts=3, per_try_timeout="250ms", on=["5xx"], budget_percent=25),
            circuit_breaker=call("circuit_breaker", max_connections=10, max_pending_requests=20, max_requests=30),
            outlier_detection=call("outlier_detection", consecutive_5xx=3, interval="5s", base_ejection_time="1m",
                                   max_ejection_percent=30),
            rate_limit=call("rate_limit", requests_per_second=100, burst=200),
            load_balancer="least_request", endpoints={"v1": ["127.0.0.1:9081"]}, mtls="strict",
        ),
        call(
            "http_route", service="reviews",
            rules=[
                call(
                    "rule",
                    match=[call("match", path_prefix="/api/", methods=["GET", "post"],
                                headers={"End-User": "jason", "X-Canary": call("regex", "^(1|yes)$"),
                                         "X-Debug": call("present")},
                                query={"beta": "1"}),
                           call("match", path_exact="/ping"), call("match", path_regex="/v[0-9]+/.*")],
                    backends={"v2": 90, "v3": 10}, timeout="1s",
                    retries=call("retries", attempts=1, per_try_timeout="500ms"),
                    fault=call("fault", delay="100ms", delay_percent=5, abort_status=503, abort_percent=1.5),
                    mirror=call("mirror", version="v3", percent=10),
                    set_request_headers={"X-Route": "api"}, remove_request_headers=["X-Debug"],
                ),
            ],
        ),
        call(
            "authorization", service="reviews", mode="audit",
            rules=[call("allow", sources=["productpage"], methods=["get"], paths=["/reviews/*", "/health"])],
        ),
        call(
            "request_test", name="jason sees v2", service="reviews", path="/api/x?y=1", method="GET",
            headers={"End-User": "jason"}, source="productpage", backends={"v2": 90, "v3": 10},
            allowed=True, status=None,
        ),
        call("request_test", name="anonymous is denied", service="reviews", allowed=False, status=403),
    )
    assert spec.mesh == MeshConfig(
        name="shop", trust_domain="shop.example", mtls="permissive", tracing=Tracing(sample_percent=5),
        access_log=AccessLog(enabled=False, max_lines_per_second=50),
        rollout=Rollout(canary_percent=10, bake_ms=60_000, max_failures=2),
    )
    assert spec.services == {
        "reviews": Service(
            port=9080, versions=("v1", "v2", "v3"), timeout_ms=2000,
            retries=Retries(attempts=3, per_try_timeout_ms=250, on=("5xx",), budget_percent=25),
            circuit_breaker=CircuitBreaker(max_connections=10, max_pending_requests=20, max_requests=30),
            outlier_detection=OutlierDetection(consecutive_5xx=3, interval_ms=5000, base_ejection_time_ms=60_000,
                                               max_ejection_percent=30),
            rate_limit=RateLimit(requests_per_second=100, burst=200),
            load_balancer="least_request", endpoints={"v1": ("127.0.0.1:9081",)}, mtls="strict",
        )
    }
    assert spec.routes == {
        "reviews": (
            Rule(
                match=(
                    Match(path_prefix="/api/", methods=("GET", "POST"),
                          headers={"end-user": StringMatch(kind="exact", value="jason"),
                                   "x-canary": StringMatch(kind="regex", value="^(1|yes)$"),
                                   "x-debug": StringMatch(kind="present")},
                          query={"beta": StringMatch(kind="exact", value="1")}),
                    Match(path_exact="/ping"),
                    Match(path_regex="/v[0-9]+/.*"),
                ),
                backends={"v2": 90, "v3": 10}, timeout_ms=1000,
                retries=Retries(attempts=1, per_try_timeout_ms=500),
                fault=Fault(delay_ms=100, delay_percent=5, abort_status=503, abort_percent=1.5),
                mirror=Mirror(version="v3", percent=10),
                set_request_headers={"x-route": "api"}, remove_request_headers=("x-debug",),
            ),
        )
    }
    assert spec.authorization == {
        "reviews": Authorization(
            rules=(Allow(sources=("productpage",), methods=("GET",), paths=("/reviews/*", "/health")),),
            mode="audit",
        )
    }
    assert spec.request_tests == (
        RequestTest(name="jason sees v2", service="reviews", path="/api/x?y=1", method="GET",
                    headers={"end-user": "jason"}, source="productpage", backends={"v2": 90, "v3": 10},
                    allowed=True),
        RequestTest(name="anonymous is denied", service="reviews", allowed=False, status=403),
    )


def test_rate_limit_burst_defaults_to_rate_rounded_up() -> None:
    spec = spec_of(mesh(), call("service", "a", rate_limit=call("rate_limit", 2.5)))
    assert spec.services["a"].rate_limit == RateLimit(requests_per_second=2.5, burst=3)
    spec = spec_of(mesh(), call("service", "a", rate_limit=call("rate_limit", 0.1)))
    assert spec.services["a"].rate_limit == RateLimit(requests_per_second=0.1, burst=1)


def test_request_test_backends_shorthand() -> None:
    spec = spec_of(mesh(), call("request_test", "t", service="a", backends="v2"))
    assert spec.request_tests[0].backends == {"v2": 100}


def test_list_repeats_are_dropped_in_order() -> None:
    spec = spec_of(
        mesh(),
        call("http_route", "a", rules=[call("rule", match=[call("match", methods=["GET", "get", "POST"])],
                                            remove_request_headers=["X-A", "x-a"])]),
        call("authorization", "a", rules=[call("allow", sources=["b", "c", "b"])]),
        call("service", "a", retries=call("retries", on=["reset", "5xx", "reset"])),
    )
    assert spec.routes["a"][0].match[0].methods == ("GET", "POST")
    assert spec.routes["a"][0].remove_request_headers == ("x-a",)
    assert spec.authorization["a"].rules[0].sources == ("b", "c")
    assert spec.services["a"].retries == Retries(on=("reset", "5xx"))


def test_source_map_for_several_rules_and_allows() -> None:
    spec = spec_of(
        mesh(),
        call("http_route", "a", rules=[call("rule", line=11, col=5), call("rule", line=12, col=5)], line=10),
        call("authorization", "a", rules=[call("allow", line=21), call("allow", line=22)], line=20),
    )
    assert spec.source_map["route/a/0"] == loc(11, 5)
    assert spec.source_map["route/a/1"] == loc(12, 5)
    assert spec.source_map["http_route/a"] == loc(10)
    assert spec.source_map["authorization/a/1"] == loc(22)


# -- normalization ---------------------------------------------------------------------


def test_same_meaning_gives_the_same_spec_and_bytes() -> None:
    first = spec_of(
        call("mesh", "demo", tracing=call("tracing", sample_percent=5.0)),
        call("service", "reviews", versions=["v1", "v2"], timeout="60s", rate_limit=call("rate_limit", 10.0)),
        call("http_route", "reviews", rules=[call("rule", backends={"v1": 50.0, "v2": 50},
                                                  match=[call("match", methods=["get"], headers={"X-User": "a"})])]),
        call("request_test", "t", service="reviews", method="get", backends={"v1": 50.0, "v2": 50}),
    )
    second = spec_of(
        call("mesh", name="demo", tracing=call("tracing", sample_percent=5)),
        call("service", name="reviews", versions=["v1", "v2"], timeout="1m", rate_limit=call("rate_limit", 10)),
        call("http_route", service="reviews",
             rules=[call("rule", match=[call("match", methods=["GET"], headers={"x-user": "a"})],
                         backends={"v2": 50, "v1": 50})]),
        call("request_test", name="t", service="reviews", method="GET", backends={"v2": 50, "v1": 50}),
    )
    assert first == second
    assert encode_canonical(first) == encode_canonical(second)
    assert b'"timeout_ms":60000' in encode_canonical(first)
    assert b'"tracing":{"sample_percent":5}' in encode_canonical(first)


# -- conflicts within one call (SM210 and friends) -------------------------------------


@pytest.mark.parametrize(
    ("nested", "fragment"),
    [
        (call("match", path_exact="/a", path_prefix="/a/", line=7), "path_exact and path_prefix"),
        (call("fault", line=7), "neither delay nor abort_status"),
        (call("fault", abort_status=503, delay_percent=10, line=7), "delay_percent given without delay"),
        (call("fault", delay="1s", abort_percent=10, line=7), "abort_percent given without abort_status"),
    ],
)
def test_conflicting_arguments_in_nested_calls(nested: Call, fragment: str) -> None:
    argument = {"match": [nested]} if nested.builtin == "match" else {"fault": nested}
    result = build(mesh(), call("http_route", "a", rules=[call("rule", line=6, **argument)], line=5))
    assert result.spec is None
    assert codes(result.findings) == ["SM210"]
    assert fragment in result.findings[0].message
    assert result.findings[0].line == 7


@pytest.mark.parametrize(
    "declaration",
    [
        call("http_route", "a", rules=[call("rule", set_request_headers={"X-A": "1"}, remove_request_headers=["x-a"])]),
        call("service", "a", retries=call("retries", attempts=2, on=[])),
        call("request_test", "t", service="a", backends="v1", status=503),
        call("request_test", "t", service="a", backends="v1", allowed=False),
    ],
)
def test_conflicting_arguments(declaration: Call) -> None:
    assert codes(build(mesh(), declaration).findings) == ["SM210"]


def test_conflict_free_variants_pass() -> None:
    spec_of(
        mesh(),
        call("service", "a", retries=call("retries", attempts=0, on=[])),
        call("request_test", "t", service="a", allowed=False, status=403),
        call("http_route", "a", rules=[call("rule", match=[call("match", path_prefix="/a/", methods=["GET"])],
                                            fault=call("fault", abort_status=503))]),
    )


def test_service_versions_must_be_present_and_unique() -> None:
    assert codes(build(mesh(), call("service", "a", versions=[])).findings) == ["SM207"]
    result = build(mesh(), call("service", "a", versions=["v1", "v2", "v1"]))
    assert codes(result.findings) == ["SM209"] and "v1 listed more than once" in result.findings[0].message


def test_http_route_needs_a_rule() -> None:
    assert codes(build(mesh(), call("http_route", "a", rules=[])).findings) == ["SM207"]


def test_request_test_name_must_not_be_empty() -> None:
    assert codes(build(mesh(), call("request_test", " ", service="a")).findings) == ["SM209"]


# -- structure -------------------------------------------------------------------------


def test_missing_mesh() -> None:
    result = build(call("service", "a"))
    assert result.spec is None
    assert codes(result.findings) == ["SM301"]
    assert (result.findings[0].file, result.findings[0].line) == ("mesh.star", 1)


def test_mesh_declared_twice() -> None:
    result = build(mesh(line=1), call("mesh", "other", line=5))
    assert codes(result.findings) == ["SM301"]
    assert result.findings[0].line == 5
    assert "(first declared at mesh.star:1:1)" in result.findings[0].message


def test_duplicate_service_points_at_the_second_and_names_the_first() -> None:
    result = build(mesh(), call("service", "a", line=3), call("service", "b", line=4), call("service", "a", line=5, col=2))
    assert result.spec is None
    assert codes(result.findings) == ["SM302"]
    f = result.findings[0]
    assert (f.line, f.col) == (5, 2)
    assert f.message == 'service "a" declared more than once (first declared at mesh.star:3:1)'


@pytest.mark.parametrize("builtin", ["http_route", "authorization"])
def test_second_route_or_authorization_for_a_service(builtin: str) -> None:
    rules = [call("rule")] if builtin == "http_route" else [call("allow")]
    other = call(builtin, "b", rules=rules, line=4)
    result = build(mesh(), call(builtin, "a", rules=rules, line=3), other, call(builtin, "a", rules=rules, line=5))
    assert codes(result.findings) == ["SM305"]
    assert result.findings[0].line == 5
    assert "mesh.star:3:1" in result.findings[0].message


def test_http_route_and_authorization_for_one_service_do_not_clash() -> None:
    spec_of(mesh(), call("http_route", "a", rules=[call("rule")]), call("authorization", "a", rules=[call("allow")]))


def test_duplicate_request_test_name() -> None:
    result = build(mesh(), call("request_test", "t", service="a", line=3), call("request_test", "t", service="b", line=4))
    assert codes(result.findings) == ["SM306"]
    assert result.findings[0].line == 4


# -- reporting -------------------------------------------------------------------------


def test_keeps_going_past_a_bad_declaration() -> None:
    result = build(
        mesh(),
        call("service", "a", timeout="2 s", line=2),
        call("service", "b", port=0, line=3),
        call("http_route", "c", rules=[call("rule", backends={"v1": 50}, line=5)], line=4),
        call("request_test", "t", service="a", method="FETCH", line=6),
    )
    assert result.spec is None
    assert [(f.code, f.line) for f in result.findings] == [("SM204", 2), ("SM207", 3), ("SM206", 5), ("SM209", 6)]
    assert all(f.severity == "error" for f in result.findings)


def test_no_follow_on_findings_from_a_bad_nested_call() -> None:
    bad_rule = call("rule", backends={"v1": 10}, retries=call("retries", per_try_timeout="x", line=9), line=8)
    result = build(mesh(), call("http_route", "a", rules=[bad_rule, call("rule", line=10)], line=7))
    assert [(f.code, f.line) for f in result.findings] == [("SM206", 8), ("SM204", 9)]


def test_a_bad_service_still_counts_for_duplicates() -> None:
    result = build(mesh(), call("service", "a", port="80", line=2), call("service", "a", line=3))
    assert [(f.code, f.line) for f in result.findings] == [("SM203", 2), ("SM302", 3)]


def test_a_badly_named_declaration_is_not_keyed() -> None:
    result = build(mesh(), call("service", "A", line=2), call("service", "A", line=3))
    assert [(f.code, f.line) for f in result.findings] == [("SM209", 2), ("SM209", 3)]


def test_message_names_builtin_and_argument_with_hint() -> None:
    result = build(mesh(), call("service", "a", timeout="2 s", line=2, col=1))
    f = result.findings[0]
    assert f.concise() == 'mesh.star:2:1: SM204 service(timeout): invalid duration "2 s"'
    assert f.hint == 'durations are an integer with ms, s, m or h, e.g. "250ms", "2s"'


# -- the rule examples under docs/rules ------------------------------------------------


def fake_evaluate(path: Path) -> Evaluation:
    """Run a small example policy as Python (the examples use the common subset): each
    builtin records a Call at the line it was called from."""
    declarations: list[Call] = []

    def builtin(name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Call:
            made = Call(name, args, kwargs, loc(sys._getframe(1).f_lineno))
            if BUILTINS[name].declares:
                declarations.append(made)
            return made

        return record

    scope: dict[str, Any] = {"__builtins__": {}, **{name: builtin(name) for name in BUILTINS}}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    return Evaluation(tuple(declarations), ("mesh.star",))


@pytest.mark.parametrize("code", MY_CODES)
def test_rule_examples(code: str) -> None:
    bad = build_spec(fake_evaluate(RULES_DIR / code / "bad" / "mesh.star"))
    assert bad.spec is None
    assert {f.code for f in bad.findings} == {code}, [f.concise() for f in bad.findings]
    good = build_spec(fake_evaluate(RULES_DIR / code / "good" / "mesh.star"))
    assert good.findings == [] and good.spec is not None


@given(
    st.lists(st.sampled_from(["x-user", "end-user", "x-canary"]), min_size=1, max_size=3, unique=True),
    st.integers(min_value=0, max_value=100),
    st.randoms(use_true_random=False),
)
def test_spelling_never_changes_the_bytes(headers: list[str], weight: int, rnd: Any) -> None:
    def spelled(upper: bool, floats: bool) -> bytes:
        names = {(h.upper() if upper and rnd.random() < 0.5 else h): "a" for h in headers}
        number: Any = float(weight) if floats else weight
        rule = call("rule", match=[call("match", headers=names, methods=["get" if upper else "GET"])],
                    backends={"v1": number, "v2": 100 - weight})
        spec = spec_of(mesh(), call("service", "a", versions=["v1", "v2"]), call("http_route", "a", rules=[rule]))
        return encode_canonical(spec)

    assert spelled(upper=True, floats=True) == spelled(upper=False, floats=False)
