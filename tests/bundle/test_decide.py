"""The decision engine's routing: matching semantics, first match wins, effective
settings, the fast path agreeing with explain, and explain's JSON shape."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starmesh.bundle.decide import DecisionTable, RequestInfo, UnknownService
from starmesh.bundle.errors import BundleError
from starmesh.bundle.spec import (
    Allow,
    Authorization,
    Fault,
    Match,
    MeshConfig,
    Mirror,
    RateLimit,
    Retries,
    Rule,
    Service,
    SourceLocation,
    Spec,
    StringMatch,
)

EXACT = StringMatch(kind="exact", value="jason")


def _spec(rules: tuple[Rule, ...] | None, **service: object) -> Spec:
    routes = {} if rules is None else {"reviews": rules}
    source_map = {f"route/reviews/{i}": SourceLocation(file="mesh.star", line=10 + i) for i in range(len(rules or ()))}
    return Spec(
        mesh=MeshConfig(name="test"),
        services={"reviews": Service(versions=("v1", "v2", "v3"), **service)},  # type: ignore[arg-type]
        routes=routes,
        source_map=source_map,
    )


def _table(*matches: Match) -> DecisionTable:
    """reviews: rule 0 with these matches -> v2, rule 1 catch-all -> v1."""
    return DecisionTable.build(_spec((Rule(match=matches, backends={"v2": 100}), Rule(backends={"v1": 100}))))


def _hits(table: DecisionTable, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None) -> bool:
    """Whether rule 0 wins on the fast path."""
    decision = table.route("reviews", method, path, headers or {})
    assert decision is not None and decision.rule is not None
    return decision.rule.index == 0


@pytest.mark.parametrize(
    ("match", "path", "hit"),
    [
        (Match(path_exact="/api"), "/api", True),
        (Match(path_exact="/api"), "/api/", False),
        (Match(path_exact="/api"), "/api?x=1", True),
        (Match(path_prefix="/api/"), "/api/v1", True),
        (Match(path_prefix="/api/"), "/apix", False),
        (Match(path_prefix="/api/"), "/x?y=/api/", False),
        (Match(path_regex="/item/[0-9]+"), "/item/42", True),
        (Match(path_regex="/item/[0-9]+"), "/item/42/x", False),
        (Match(path_regex="/item/[0-9]+"), "/v/item/42", False),
        (Match(path_regex="/item/[0-9]+"), "/item/42?a=b", True),
    ],
)
def test_path_conditions_full_match_and_ignore_query(match: Match, path: str, hit: bool) -> None:
    assert _hits(_table(match), path) is hit


def test_methods_are_case_insensitive() -> None:
    table = _table(Match(methods=("get", "POST")))
    assert _hits(table, method="GET")
    assert _hits(table, method="post")
    assert not _hits(table, method="DELETE")


@pytest.mark.parametrize(
    ("cond", "headers", "hit"),
    [
        (EXACT, {"end-user": "jason"}, True),
        (EXACT, {"end-user": "Jason"}, False),
        (EXACT, {}, False),
        (StringMatch(kind="regex", value="j.*n"), {"end-user": "jason"}, True),
        (StringMatch(kind="regex", value="j.*"), {"end-user": "xjason"}, False),
        (StringMatch(kind="present"), {"end-user": ""}, True),
        (StringMatch(kind="present"), {"other": "x"}, False),
    ],
)
def test_header_conditions(cond: StringMatch, headers: dict[str, str], hit: bool) -> None:
    # The policy's header name is upper-case: names are case-insensitive.
    assert _hits(_table(Match(headers={"End-User": cond})), headers=headers) is hit


@pytest.mark.parametrize(
    ("cond", "path", "hit"),
    [
        (StringMatch(kind="exact", value="1"), "/?debug=1", True),
        (StringMatch(kind="exact", value="1"), "/?debug=2&debug=1", False),
        (StringMatch(kind="exact", value="a b"), "/?debug=a%20b", True),
        (StringMatch(kind="present"), "/?debug", True),
        (StringMatch(kind="present"), "/?other=1", False),
        (StringMatch(kind="regex", value="[0-9]+"), "/?debug=12", True),
        (StringMatch(kind="regex", value="[0-9]+"), "/?debug=12x", False),
        (StringMatch(kind="present"), "/", False),
    ],
)
def test_query_conditions(cond: StringMatch, path: str, hit: bool) -> None:
    assert _hits(_table(Match(query={"debug": cond})), path) is hit


def test_query_may_be_passed_separately() -> None:
    table = _table(Match(path_exact="/a", query={"k": StringMatch(kind="exact", value="v")}))
    decision = table.route("reviews", "GET", "/a", {}, "k=v")
    assert decision is not None and decision.rule is not None and decision.rule.index == 0


def test_matches_are_or_and_fields_are_and() -> None:
    table = _table(Match(path_prefix="/a", methods=("GET",)), Match(headers={"x": EXACT}))
    assert _hits(table, "/a/1", "GET")
    assert not _hits(table, "/a/1", "POST")
    assert _hits(table, "/b", "POST", {"x": "jason"})
    assert not _hits(table, "/b", "GET")


def test_first_matching_rule_wins() -> None:
    rules = (
        Rule(match=(Match(path_prefix="/a/b"),), backends={"v3": 100}),
        Rule(match=(Match(path_prefix="/a"),), backends={"v2": 100}),
        Rule(backends={"v1": 100}),
        Rule(backends={"v2": 100}),
    )
    table = DecisionTable.build(_spec(rules))
    for path, index in (("/a/b/c", 0), ("/a/x", 1), ("/z", 2)):
        decision = table.route("reviews", "GET", path, {})
        assert decision is not None and decision.rule is not None
        assert decision.rule.index == index


def test_no_matching_rule_is_no_route_and_unknown_service_is_none() -> None:
    table = DecisionTable.build(_spec((Rule(match=(Match(path_exact="/only"),)),)))
    decision = table.route("reviews", "GET", "/other", {})
    assert decision is not None and decision.rule is None
    assert table.route("nope", "GET", "/", {}) is None
    with pytest.raises(UnknownService, match="nope"):
        table.explain(RequestInfo(service="nope"))
    explained = table.explain(RequestInfo(service="reviews", path="/other")).to_json()
    assert explained["response"] == {"status": 404, "reason": "no-route"}
    assert explained["rule"] is None and explained["backends"] is None


def test_service_without_http_route_goes_to_all_endpoints() -> None:
    table = DecisionTable.build(_spec(None, timeout_ms=2000))
    decision = table.route("reviews", "PUT", "/anything", {})
    assert decision is not None and decision.rule is not None
    assert decision.rule.index is None and decision.rule.backends == () and decision.rule.pick(50) is None
    explained = table.explain(RequestInfo(service="reviews")).to_json()
    assert explained["steps"] == [] and explained["rule"] is None
    assert explained["backends"] == {"v1": 34, "v2": 33, "v3": 33}
    assert explained["timeout"] == "2s" and explained["response"] is None


def test_weighted_backends_pick_by_cumulative_weight() -> None:
    table = DecisionTable.build(_spec((Rule(backends={"v1": 90, "v2": 0, "v3": 10}),)))
    rule = table.services["reviews"].rules[0]
    assert rule.backends == ("v1", "v3") and rule.cumulative == (90, 100)
    picks = [rule.pick(roll) for roll in range(100)]
    assert picks.count("v1") == 90 and picks.count("v3") == 10
    assert rule.pick(99.999) == "v3"


def test_rule_timeout_and_retries_override_the_service() -> None:
    svc_retries = Retries(attempts=1)
    rule_retries = Retries(attempts=3, per_try_timeout_ms=250)
    rules = (Rule(match=(Match(path_prefix="/slow"),), timeout_ms=60_000, retries=rule_retries), Rule())
    table = DecisionTable.build(_spec(rules, timeout_ms=1500, retries=svc_retries, mtls="permissive"))
    svc = table.services["reviews"]
    assert (svc.rules[0].timeout_ms, svc.rules[0].retries) == (60_000, rule_retries)
    assert (svc.rules[1].timeout_ms, svc.rules[1].retries) == (1500, svc_retries)
    assert svc.mtls == "permissive"
    assert DecisionTable.build(_spec(None)).services["reviews"].mtls == "strict"


def test_header_mutations_are_prepared() -> None:
    rule = Rule(set_request_headers={"X-Canary": "1"}, remove_request_headers=("Cookie",))
    prepared = DecisionTable.build(_spec((rule,))).services["reviews"].rules[0]
    assert prepared.set_request_headers == (("x-canary", "1"),)
    assert prepared.remove_request_headers == ("cookie",)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec((Rule(match=(Match(path_regex="("),)),)), "route/reviews/0: invalid regex"),
        (_spec((Rule(match=(Match(headers={"a": StringMatch(kind="regex", value="[")}),)),)), "invalid regex"),
        (_spec((Rule(backends={"v9": 100}),)), "'v9'"),
        (_spec((Rule(backends={"v1": 50}),)), "sum to 50"),
        (_spec((Rule(mirror=Mirror(version="v7")),)), "mirror"),
        (Spec(mesh=MeshConfig(name="m"), routes={"ghost": (Rule(),)}), "undeclared service 'ghost'"),
        (Spec(mesh=MeshConfig(name="m"), authorization={"ghost": Authorization()}), "undeclared service 'ghost'"),
    ],
)
def test_build_rejects_what_cannot_be_decided(spec: Spec, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        DecisionTable.build(spec)


def test_explain_json_has_exactly_the_designed_shape() -> None:
    rules = (
        Rule(
            match=(Match(path_prefix="/api/"), Match(headers={"end-user": StringMatch(kind="exact", value="bob")})),
            backends={"v1": 100},
        ),
        Rule(
            match=(Match(headers={"end-user": EXACT}),),
            backends={"v2": 90, "v3": 10},
            timeout_ms=250,
            retries=Retries(attempts=2, per_try_timeout_ms=100),
            fault=Fault(delay_ms=2000, delay_percent=10),
            mirror=Mirror(version="v3", percent=5),
        ),
    )
    spec = _spec(rules, rate_limit=RateLimit(requests_per_second=50, burst=100))
    spec = Spec(
        mesh=spec.mesh,
        services=spec.services,
        routes=spec.routes,
        authorization={"reviews": Authorization(rules=(Allow(sources=("productpage",)),))},
        source_map={**spec.source_map, "authorization/reviews/0": SourceLocation(file="authz.star", line=3)},
    )
    request = RequestInfo(service="reviews", path="/x?q=1", headers=(("End-User", "jason"),), source="productpage")
    got = DecisionTable.build(spec).explain(request).to_json()
    json.dumps(got)  # serializable as is
    assert got == {
        "service": "reviews",
        "request": {"method": "GET", "path": "/x?q=1", "headers": {"end-user": "jason"}, "source": "productpage"},
        "steps": [
            {
                "rule": 0,
                "file": "mesh.star",
                "line": 10,
                "matched": False,
                "why": 'match 0: path /x does not start with /api/; match 1: header end-user is "jason", not "bob"',
            },
            {"rule": 1, "file": "mesh.star", "line": 11, "matched": True, "why": 'header end-user is "jason"'},
        ],
        "rule": {"index": 1, "file": "mesh.star", "line": 11},
        "backends": {"v2": 90, "v3": 10},
        "timeout": "250ms",
        "retries": {"attempts": 2, "per_try_timeout": "100ms", "on": ["5xx", "connect-failure", "reset"], "budget_percent": 20},
        "fault": {"delay": "2s", "delay_percent": 10, "abort_status": None, "abort_percent": 0},
        "mirror": {"version": "v3", "percent": 5},
        "rate_limit": {"requests_per_second": 50, "burst": 100},
        "authorization": {
            "allowed": True,
            "mode": "enforce",
            "rule": {"index": 0, "file": "authz.star", "line": 3},
            "would_deny": False,
            "why": "allow[0] (authz.star:3) admits source productpage",
        },
        "response": None,
        # Added to DESIGN's keys (never renamed): the service-level settings the calling proxy applies.
        "load_balancer": "round_robin",
        "circuit_breaker": {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024},
        "outlier_detection": None,
        "mtls": "strict",
    }


def test_fault_that_always_aborts_is_the_proxys_answer() -> None:
    always = Rule(fault=Fault(abort_status=503, abort_percent=100))
    sometimes = Rule(fault=Fault(abort_status=503, abort_percent=50))
    got = DecisionTable.build(_spec((always,))).explain(RequestInfo(service="reviews")).to_json()
    assert got["response"] == {"status": 503, "reason": "fault"}
    got = DecisionTable.build(_spec((sometimes,))).explain(RequestInfo(service="reviews")).to_json()
    assert got["response"] is None and got["fault"]["abort_percent"] == 50


# A fixed table exercising every kind of condition, for the agreement property below.
_AGREEMENT_RULES = (
    Rule(match=(Match(path_exact="/a", methods=("POST",)),), backends={"v1": 100}),
    Rule(match=(Match(path_regex="/b/[0-9]+"), Match(headers={"x-user": StringMatch(kind="regex", value="a+")})),
         backends={"v2": 100}),
    Rule(match=(Match(path_prefix="/c", query={"q": StringMatch(kind="exact", value="1")}),), backends={"v3": 100}),
    Rule(match=(Match(headers={"x-flag": StringMatch(kind="present")}, query={"r": StringMatch(kind="present")}),)),
    Rule(match=(Match(path_prefix="/d"),), backends={"v1": 50, "v2": 50}),
)
_AGREEMENT_TABLE = DecisionTable.build(
    Spec(
        mesh=MeshConfig(name="agree"),
        services={"reviews": Service(versions=("v1", "v2", "v3"))},
        routes={"reviews": _AGREEMENT_RULES},
        authorization={
            "reviews": Authorization(
                rules=(Allow(sources=("productpage",), paths=("/a", "/c*")), Allow(methods=("GET",), paths=("/d/*",)))
            )
        },
    )
)
_segments = st.sampled_from(["a", "b", "c", "d", "1", "42", "cc", ""])
_paths = st.lists(_segments, max_size=3).map(lambda parts: "/" + "/".join(parts))
_queries = st.one_of(st.none(), st.sampled_from(["q=1", "q=2", "r", "r=&q=1", "q=1&q=2", "x=%20"]))
_headers = st.dictionaries(
    st.sampled_from(["x-user", "X-Flag", "x-other"]), st.sampled_from(["", "a", "aaa", "ab", "A"]), max_size=3
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "post", "PUT"]),
    path=_paths,
    query=_queries,
    headers=_headers,
    source=st.sampled_from([None, "productpage", "ratings"]),
)
def test_fast_path_and_explain_agree(
    method: str, path: str, query: str | None, headers: dict[str, str], source: str | None
) -> None:
    table = _AGREEMENT_TABLE
    full_path = path if query is None else f"{path}?{query}"
    lowered = {k.lower(): v for k, v in headers.items()}
    fast = table.route("reviews", method, full_path, lowered)
    split = table.route("reviews", method, path, lowered, query)
    explained = table.explain(RequestInfo(service="reviews", method=method, path=full_path, headers=headers, source=source))
    assert fast is not None and fast is split
    assert (fast.rule is None) == (explained.rule is None)
    if fast.rule is not None and explained.rule is not None:
        index = fast.rule.index
        assert index is not None and index == explained.rule.index
        assert [s.matched for s in explained.steps] == [False] * index + [True]
    assert table.authorize("reviews", source, method, full_path) == explained.authorization
