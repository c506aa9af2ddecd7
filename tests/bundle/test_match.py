"""PreparedMatch: the compiled `holds` (routing's test) agrees with `test` for every condition kind."""

from __future__ import annotations

import itertools

from starmesh.bundle.match import RequestView, any_match, prepare_match
from starmesh.bundle.spec import Match, StringMatch

MATCHES = [
    Match(),
    Match(path_exact="/a"),
    Match(path_prefix="/a"),
    Match(path_regex="/a/[0-9]+"),
    Match(methods=("get", "PUT")),
    Match(headers={"X-Canary": StringMatch(kind="exact", value="true")}),
    Match(headers={"x-canary": StringMatch(kind="present")}),
    Match(headers={"x-user": StringMatch(kind="regex", value="ad.*")}),
    Match(query={"v": StringMatch(kind="exact", value="2")}),
    Match(path_prefix="/a", methods=("GET",), headers={"x-canary": StringMatch(kind="exact", value="true")}),
]

REQUESTS = [
    RequestView(method, path, headers, query)
    for method, path, headers, query in itertools.product(
        ["GET", "POST"],
        ["/", "/a", "/a/12", "/b"],
        [{}, {"x-canary": "true"}, {"x-canary": "false", "x-user": "admin"}],
        [None, "v=2", "v=3"],
    )
]


def test_holds_agrees_with_test_for_every_condition_kind() -> None:
    for match in MATCHES:
        prepared = prepare_match(match, "route/t/0")
        for req in REQUESTS:
            assert prepared.holds(req) is prepared.test(req), (match, req)


def test_any_match_holds_when_one_match_does() -> None:
    prepared = tuple(prepare_match(m, "route/t/0") for m in MATCHES[1:3])  # path_exact /a, path_prefix /a
    applies = any_match(prepared)
    assert [applies(r) for r in REQUESTS] == [any(m.test(r) for m in prepared) for r in REQUESTS]
    assert applies(RequestView("GET", "/a/12", {}, None)) and not applies(RequestView("GET", "/b", {}, None))
