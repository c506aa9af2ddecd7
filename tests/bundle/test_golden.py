"""Golden requests: passing and failing expectations and their messages."""

from __future__ import annotations

import pytest

from starmesh.bundle.decide import DecisionTable, run_request_tests
from starmesh.bundle.spec import (
    Allow,
    Authorization,
    Fault,
    Match,
    MeshConfig,
    RateLimit,
    RequestTest,
    Rule,
    Service,
    SourceLocation,
    Spec,
    StringMatch,
)

JASON = Match(headers={"end-user": StringMatch(kind="exact", value="jason")})


def _table(*tests: RequestTest) -> DecisionTable:
    return DecisionTable.build(
        Spec(
            mesh=MeshConfig(name="bookinfo"),
            services={
                "reviews": Service(versions=("v1", "v2", "v3")),
                "ratings": Service(rate_limit=RateLimit(requests_per_second=10, burst=10)),
                "details": Service(versions=("v1", "v2")),
                "flaky": Service(),
            },
            routes={
                "reviews": (
                    Rule(match=(Match(path_prefix="/admin"),), fault=Fault(abort_status=418, abort_percent=100)),
                    Rule(match=(Match(path_prefix="/slow"),), fault=Fault(abort_status=503, abort_percent=10)),
                    Rule(match=(JASON,), backends={"v2": 100}),
                    Rule(match=(Match(path_prefix="/"),), backends={"v1": 90, "v3": 10}),
                ),
                "ratings": (Rule(match=(Match(path_prefix="/ratings"),)),),
            },
            authorization={"ratings": Authorization(rules=(Allow(sources=("reviews",)),))},
            request_tests=tests,
            source_map={
                "route/reviews/2": SourceLocation(file="mesh.star", line=31),
                "route/reviews/3": SourceLocation(file="mesh.star", line=34),
            },
        )
    )


def _messages(*tests: RequestTest) -> list[str]:
    failures = run_request_tests(_table(*tests))
    return [f.message for f in failures]


@pytest.mark.parametrize(
    "test",
    [
        RequestTest(name="jason", service="reviews", headers={"End-User": "jason"}, backends={"v2": 100}),
        RequestTest(name="others", service="reviews", backends={"v1": 90, "v3": 10.0}),
        RequestTest(name="zero weights ignored", service="reviews", backends={"v1": 90, "v2": 0, "v3": 10}),
        RequestTest(name="no route", service="reviews", path="", status=404),
        RequestTest(name="ratings denied", service="ratings", path="/ratings/1", source="productpage", allowed=False, status=403),
        RequestTest(name="ratings allowed", service="ratings", path="/ratings/1", source="reviews", allowed=True),
        RequestTest(name="ratings split", service="ratings", path="/ratings/1", source="reviews", backends={"v1": 100}),
        RequestTest(name="rate limited", service="ratings", path="/ratings/1", source="reviews", status=429),
        RequestTest(name="teapot", service="reviews", path="/admin", status=418),
        RequestTest(name="equal shares", service="details", backends={"v1": 50, "v2": 50}),
        RequestTest(name="no authz", service="details", allowed=True),
    ],
    ids=lambda t: t.name,
)
def test_passing_request_tests(test: RequestTest) -> None:
    assert _messages(test) == []


@pytest.mark.parametrize(
    ("test", "message"),
    [
        (
            RequestTest(name="jason sees v2", service="reviews", headers={"end-user": "bob"}, backends={"v2": 100}),
            'request_test "jason sees v2": expected backends {"v2": 100}, got {"v1": 90, "v3": 10} (rule 3 at mesh.star:34)',
        ),
        (
            RequestTest(name="v3", service="reviews", headers={"end-user": "jason"}, backends={"v3": 100}),
            'request_test "v3": expected backends {"v3": 100}, got {"v2": 100} (rule 2 at mesh.star:31)',
        ),
        (
            RequestTest(name="denied reaches", service="ratings", path="/ratings/1", backends={"v1": 100}),
            'request_test "denied reaches": expected backends {"v1": 100}, but the proxy answers 403 denied (rule 0)',
        ),
        (
            RequestTest(name="allowed?", service="ratings", path="/ratings/1", source="details", allowed=True),
            'request_test "allowed?": expected allowed=true, got denied (enforce)',
        ),
        (
            RequestTest(name="no route", service="ratings", path="/other", source="reviews", backends={"v1": 100}),
            'request_test "no route": expected backends {"v1": 100}, but the proxy answers 404 no-route (no rule matched)',
        ),
        (
            RequestTest(name="forwarded", service="reviews", status=200),
            'request_test "forwarded": expected status 200, but forwarded to {"v1": 90, "v3": 10} (rule 3 at mesh.star:34);'
            " status is the answer the proxy itself gives: give backends to assert the request reaches an app",
        ),
        (
            RequestTest(name="maybe fault", service="reviews", path="/slow", status=503),
            'request_test "maybe fault": expected status 503, but forwarded to {"v1": 34, "v2": 33, "v3": 33} (rule 1);'
            " status is the answer the proxy itself gives: give backends to assert the request reaches an app",
        ),
        (
            RequestTest(name="429", service="details", status=429),
            'request_test "429": expected status 429, but service details has no rate_limit',
        ),
        (
            RequestTest(name="wrong status", service="reviews", path="/admin", status=503),
            'request_test "wrong status": expected status 503, got 418 fault (rule 0)',
        ),
        (
            RequestTest(name="ghost", service="ghost", backends={"v1": 100}),
            "request_test \"ghost\": unknown service 'ghost'",
        ),
        (
            RequestTest(name="two", service="ratings", path="/x", backends={"v1": 100}, allowed=True),
            'request_test "two": expected backends {"v1": 100}, but the proxy answers 404 no-route (no rule matched);'
            " expected allowed=true, got denied (enforce)",
        ),
    ],
    ids=lambda v: v.name if isinstance(v, RequestTest) else "",
)
def test_failing_request_tests(test: RequestTest, message: str) -> None:
    assert _messages(test) == [message]


def test_failures_carry_the_test_and_its_location_key_and_default_to_the_spec() -> None:
    passing = RequestTest(name="ok", service="reviews", backends={"v1": 90, "v3": 10})
    failing = RequestTest(name="bad", service="reviews", backends={"v2": 100})
    table = _table(passing, failing)
    failures = run_request_tests(table)
    assert [(f.test, f.location_key) for f in failures] == [(failing, "request_test/bad")]
    assert run_request_tests(table, [passing]) == []
    assert run_request_tests(table, []) == []
