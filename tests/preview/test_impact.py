"""Sample requests before and after: the requests file, golden requests, the flags.

Policies are real ones, compiled from tmp dirs; requests are decided by the bundle's
DecisionTable, the code the proxy runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.explain import RequestInfo
from starmesh.preview.impact import (
    MAX_REQUESTS,
    MAX_REQUESTS_BYTES,
    RequestsFileError,
    SampleRequest,
    decide,
    golden_samples,
    impact_flags,
    load_requests,
    request_impacts,
)
from starmesh.preview.model import Outcome, RequestImpact

SERVICES = """
mesh("shop")
service("productpage")
service("ratings")
service("reviews", versions = ["v1", "v2"])
"""

JASON_V2 = 'rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100})'


def reviews_route(*rules: str) -> str:
    return 'http_route("reviews", rules = [\n    ' + ",\n    ".join(rules) + ",\n])\n"


BASE = SERVICES + reviews_route(JASON_V2, 'rule(backends = {"v1": 100})')


def table(h: Any, text: str) -> DecisionTable:
    """`text` compiled as a mesh.star of its own; the bundle's decision table."""
    return DecisionTable.build(h.compiled(text).bundle.spec)


def tables(h: Any, base: str, head: str) -> tuple[DecisionTable, DecisionTable]:
    return table(h, base), table(h, head)


def sample(name: str = "s", **request: Any) -> SampleRequest:
    request.setdefault("service", "reviews")
    return SampleRequest(name, RequestInfo(**request))


def only(impacts: list[RequestImpact], origin: str = "file") -> RequestImpact:
    picked = [i for i in impacts if i.origin == origin]
    assert len(picked) == 1, impacts
    return picked[0]


# -- the requests file -----------------------------------------------------------------------


@pytest.fixture
def requests_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """requests.json in the current directory, so messages name it as a user gave it."""
    monkeypatch.chdir(tmp_path)
    return Path("requests.json")


def test_a_valid_file_loads_with_defaults_normalized_values_and_generated_names(requests_file: Path) -> None:
    requests_file.write_text(
        json.dumps(
            [
                {"service": "reviews", "path": "/reviews/1"},
                {
                    "name": "login",
                    "service": "productpage",
                    "method": "post",
                    "path": "/login?next=/",
                    "headers": {"X-User": "ann", "accept": "text/html"},
                    "source": None,
                },
                {"service": "reviews", "path": "/reviews/1"},
                {"service": "ratings", "source": "reviews"},
            ]
        )
    )
    assert load_requests(requests_file) == [
        SampleRequest("GET /reviews/1 → reviews", RequestInfo(service="reviews", path="/reviews/1", headers={})),
        SampleRequest(
            "login",
            RequestInfo(
                service="productpage",
                method="POST",
                path="/login?next=/",
                headers={"accept": "text/html", "x-user": "ann"},
            ),
        ),
        SampleRequest("GET /reviews/1 → reviews #3", RequestInfo(service="reviews", path="/reviews/1", headers={})),
        SampleRequest("GET / → ratings (from reviews)", RequestInfo(service="ratings", headers={}, source="reviews")),
    ]


def test_an_empty_array_is_no_requests(requests_file: Path) -> None:
    requests_file.write_text("[]\n")
    assert load_requests(requests_file) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"service": "reviews"},\n {"service" "x"}]', "requests.json:2:13: not valid JSON: Expecting ':' delimiter"),
        ("", "requests.json:1:1: not valid JSON: Expecting value"),
        ('[{"service": "reviews", "path": NaN}]', "requests.json: not valid JSON: NaN is not a JSON number"),
        ('{"service": "reviews"}', 'requests.json: expected a JSON array of requests, e.g. [{"service": "reviews"}]'),
        ('[{"service": "reviews"}, "ratings"]', 'requests.json: item 2: expected an object with at least a "service"'),
        ('[{"name": "login", "path": "/login"}]', "requests.json: item 1 (\"login\"): 'service' is required"),
        (
            '[{"service": "reviews", "url": "/x"}]',
            "requests.json: item 1: unknown key 'url' (the keys are name, service, method, path, headers, source)",
        ),
        ('[{"service": "reviews", "service": "ratings"}]', "requests.json: item 1: 'service' is given twice"),
        ('[{"service": 7}]', "requests.json: item 1: 'service' must be a string, not a number"),
        ('[{"service": "reviews", "source": false}]', "requests.json: item 1: 'source' must be a string or null, not a boolean"),
        ('[{"service": "reviews", "name": null}]', "requests.json: item 1: 'name' must be a string, not null"),
        (
            '[{"name": "login", "service": "reviews", "path": "login"}]',
            'requests.json: item 1 ("login"): path "login" does not start with "/" (write paths from the root, e.g. "/api/")',
        ),
        ('[{"service": "Reviews"}]', 'requests.json: item 1: invalid name "Reviews" ('),
        ('[{"service": "reviews", "method": "FETCH"}]', 'requests.json: item 1: unknown HTTP method "FETCH" (methods are GET,'),
        ('[{"service": "reviews", "headers": ["a"]}]', "requests.json: item 1: 'headers' must be an object, e.g."),
        ('[{"service": "reviews", "headers": {"a b": "c"}}]', 'requests.json: item 1: invalid header name "a b" ('),
        ('[{"service": "reviews", "headers": {"a": 1}}]', "requests.json: item 1: header 'a' must be a string, not a number"),
        ('[{"service": "reviews", "headers": {"a": "x\\ny"}}]', 'requests.json: item 1: header value "x\\ny" contains CR, LF'),
        ('[{"service": "reviews", "headers": {"A": "1", "a": "2"}}]', "requests.json: item 1: header 'a' is given twice"),
        ('[{"service": "reviews", "name": " "}]', "requests.json: item 1 (\" \"): 'name' must not be empty"),
        (
            '[{"service": "reviews", "name": "x"}, {"service": "ratings"}, {"service": "ratings", "name": "x"}]',
            'requests.json: item 3 ("x"): the name is already used by item 1',
        ),
    ],
)
def test_bad_files_are_refused_naming_the_file_and_the_item(requests_file: Path, text: str, message: str) -> None:
    requests_file.write_text(text)
    with pytest.raises(RequestsFileError) as caught:
        load_requests(requests_file)
    assert str(caught.value).startswith(message)


def test_a_file_that_is_not_utf8_or_cannot_be_read_is_refused(requests_file: Path) -> None:
    with pytest.raises(RequestsFileError, match=r"^requests.json: cannot read it: No such file or directory$"):
        load_requests(requests_file)
    requests_file.write_bytes(b'[{"service": "r\xe9views"}]')
    with pytest.raises(RequestsFileError, match=r"^requests.json: not UTF-8 text \(byte 15\)$"):
        load_requests(requests_file)


def test_at_most_one_mebibyte_is_read(requests_file: Path) -> None:
    item = '{"service": "reviews"}'
    padding = MAX_REQUESTS_BYTES - len(item) - 2
    requests_file.write_text("[" + item + " " * padding + "]")
    assert len(load_requests(requests_file)) == 1
    requests_file.write_text("[" + item + " " * (padding + 1) + "]")
    with pytest.raises(RequestsFileError, match=r"^requests.json: larger than 1 MiB"):
        load_requests(requests_file)


def test_json_nested_too_deeply_is_refused(requests_file: Path) -> None:
    requests_file.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(RequestsFileError, match=r"^requests.json: JSON nested too deeply to be a list of requests$"):
        load_requests(requests_file)


def test_at_most_ten_thousand_requests(requests_file: Path) -> None:
    item = '{"service": "reviews"}'
    requests_file.write_text("[" + ",".join([item] * MAX_REQUESTS) + "]")
    assert len(load_requests(requests_file)) == MAX_REQUESTS
    requests_file.write_text("[" + ",".join([item] * (MAX_REQUESTS + 1)) + "]")
    with pytest.raises(RequestsFileError, match=r"^requests.json: 10,001 requests; at most 10,000 are allowed$"):
        load_requests(requests_file)


# -- golden requests -------------------------------------------------------------------------


def test_golden_samples_are_the_policys_request_tests_in_order(h: Any) -> None:
    text = BASE + (
        'request_test("jason sees v2", service = "reviews", headers = {"end-user": "jason"}, backends = "v2")\n'
        'request_test("ann posts", service = "reviews", method = "POST", path = "/r?x=1", source = "productpage")\n'
    )
    samples = golden_samples(table(h, text).spec)
    assert samples == [
        SampleRequest("jason sees v2", RequestInfo(service="reviews", headers={"end-user": "jason"})),
        SampleRequest(
            "ann posts", RequestInfo(service="reviews", method="POST", path="/r?x=1", headers={}, source="productpage")
        ),
    ]


def test_golden_requests_of_both_sides_come_first_deduplicated_with_the_heads_definition(h: Any) -> None:
    base = BASE + (
        'request_test("shared", service = "reviews", path = "/old")\n'
        'request_test("base only", service = "reviews", path = "/b")\n'
    )
    head = BASE + (
        'request_test("head only", service = "reviews", path = "/h")\n'
        'request_test("shared", service = "reviews", path = "/new")\n'
    )
    impacts = request_impacts(*tables(h, base, head), [sample("from the file", path="/f")])
    assert [(i.origin, i.name, i.request["path"]) for i in impacts] == [
        ("golden", "head only", "/h"),
        ("golden", "shared", "/new"),
        ("golden", "base only", "/b"),
        ("file", "from the file", "/f"),
    ]


def test_golden_requests_are_included_when_only_the_base_has_them_and_show_the_change(h: Any) -> None:
    base = BASE + 'request_test("ann gets v1", service = "reviews", headers = {"end-user": "ann"}, backends = "v1")\n'
    head = SERVICES + reviews_route(JASON_V2, 'rule(backends = {"v1": 50, "v2": 50})')
    impact = only(request_impacts(*tables(h, base, head)), "golden")
    assert impact.name == "ann gets v1"
    assert impact.before.backends == {"v1": 100}
    assert impact.after.backends == {"v1": 50, "v2": 50}
    assert impact.changed == ("destination",)


def test_golden_requests_are_included_when_only_the_head_has_them(h: Any) -> None:
    head = BASE + 'request_test("jason sees v2", service = "reviews", headers = {"end-user": "jason"}, backends = "v2")\n'
    impacts = request_impacts(*tables(h, BASE, head))
    assert [(i.origin, i.name, i.changed) for i in impacts] == [("golden", "jason sees v2", ())]


# -- what changed ------------------------------------------------------------------------------


ALLOWED = {"allowed": True, "response": None}


def test_an_unchanged_request_has_no_flags_and_both_outcomes_in_full(h: Any) -> None:
    old, new = tables(h, BASE, "# the same policy, reformatted\n" + BASE)
    impact = only(request_impacts(old, new, [sample("jason", headers={"End-User": "jason"}, source="productpage")]))
    assert impact.changed == ()
    assert impact.to_json() == {
        "name": "jason",
        "origin": "file",
        "request": {
            "service": "reviews",
            "method": "GET",
            "path": "/",
            "headers": {"end-user": "jason"},
            "source": "productpage",
        },
        "before": {"backends": {"v2": 100}, "rule": {"index": 0, "file": "mesh.star", "line": 7}, **ALLOWED},
        "after": {"backends": {"v2": 100}, "rule": {"index": 0, "file": "mesh.star", "line": 8}, **ALLOWED},
        "changed": [],
    }


def test_a_new_split_is_a_destination_change(h: Any) -> None:
    head = SERVICES + reviews_route(JASON_V2, 'rule(backends = {"v1": 50, "v2": 50})')
    samples = [sample("ann", path="/reviews/1"), sample("jason", headers={"end-user": "jason"})]
    impacts = request_impacts(*tables(h, BASE, head), samples)
    assert [(i.name, i.changed) for i in impacts] == [("ann", ("destination",)), ("jason", ())]


def test_a_version_drained_to_zero_percent_is_no_destination_change(h: Any) -> None:
    head = SERVICES + reviews_route(JASON_V2, 'rule(backends = {"v1": 100, "v2": 0})')
    impact = only(request_impacts(*tables(h, BASE, head), [sample()]))
    assert impact.after.backends == {"v1": 100, "v2": 0}
    assert impact.changed == ()


def test_an_authorization_that_denies_a_caller_is_an_authorization_and_response_change(h: Any) -> None:
    head = BASE + 'authorization("reviews", rules = [allow(sources = ["productpage"])])\n'
    samples = [sample("from ratings", source="ratings"), sample("from productpage", source="productpage")]
    impacts = request_impacts(*tables(h, BASE, head), samples)
    denied, admitted = impacts
    assert (denied.before.allowed, denied.after.allowed) == (True, False)
    assert denied.after.response == {"status": 403, "reason": "denied"}
    assert denied.changed == ("authorization", "response")
    assert admitted.changed == ()


def test_audit_mode_changes_authorization_without_a_response(h: Any) -> None:
    base = BASE + 'authorization("reviews", rules = [allow(sources = ["productpage"])], mode = "audit")\n'
    head = BASE + 'authorization("reviews", rules = [allow(sources = ["productpage"])])\n'
    impact = only(request_impacts(*tables(h, base, head), [sample(source="ratings")]))
    assert impact.changed == ("authorization", "response")
    old, new = tables(h, BASE, base)
    assert only(request_impacts(old, new, [sample(source="ratings")])).changed == ()


def test_a_fault_aborting_every_request_is_a_response_change(h: Any) -> None:
    boom = (
        'rule(match = [match(path_prefix = "/boom")], '
        'fault = fault(abort_status = 503, abort_percent = 100), backends = {"v1": 100})'
    )
    head = SERVICES + reviews_route(boom, JASON_V2, 'rule(backends = {"v1": 100})')
    impacts = request_impacts(*tables(h, BASE, head), [sample("boom", path="/boom/1"), sample("calm", path="/calm")])
    boomed, calm = impacts
    assert (boomed.before.response, boomed.after.response) == (None, {"status": 503, "reason": "fault"})
    assert boomed.before.backends == boomed.after.backends == {"v1": 100}
    assert boomed.changed == ("response",)
    assert calm.changed == ()


def test_a_request_left_without_a_rule_changes_destination_and_response(h: Any) -> None:
    head = SERVICES + reviews_route(JASON_V2, 'rule(match = [match(path_prefix = "/reviews")], backends = {"v1": 100})')
    impact = only(request_impacts(*tables(h, BASE, head), [sample(path="/other")]))
    assert impact.after == Outcome(backends=None, rule=None, allowed=True, response={"status": 404, "reason": "no-route"})
    assert impact.changed == ("destination", "response")


def test_a_service_removed_on_the_head_side_is_an_error_outcome(h: Any) -> None:
    head = BASE.replace('service("ratings")\n', "")
    impact = only(request_impacts(*tables(h, BASE, head), [sample(service="ratings")]))
    assert impact.before.backends == {"v1": 100} and impact.before.rule is None  # no http_route: all endpoints
    assert impact.after == Outcome(error="unknown service 'ratings': the bundle does not declare it")
    assert impact.after.to_json() == {"error": "unknown service 'ratings': the bundle does not declare it"}
    assert impact.changed == ("destination", "authorization", "response")


def test_a_service_neither_side_declares_is_no_change(h: Any) -> None:
    impact = only(request_impacts(*tables(h, BASE, BASE), [sample(service="nope")]))
    assert impact.before.error is not None and impact.after.error is not None
    assert impact.changed == ()


def test_an_unknown_service_counts_as_the_proxys_404_no_route(h: Any) -> None:
    """The proxy answers 404 `no-route` for a service its bundle lacks: against a side
    that also gets no rule, only authorization (unknown on one side) differs."""
    no_rule = SERVICES + reviews_route(JASON_V2)
    unknown = Outcome(error="unknown service 'reviews': the bundle does not declare it")
    nowhere = decide(table(h, no_rule), RequestInfo(service="reviews"))
    assert nowhere.response == {"status": 404, "reason": "no-route"}
    assert impact_flags(unknown, nowhere) == ("authorization",)
    assert impact_flags(nowhere, unknown) == ("authorization",)
