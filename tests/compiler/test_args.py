"""Binding builtin calls to parameters and checking argument kinds (compiler/args.py)."""

from __future__ import annotations

from typing import Any

import pytest

from starmesh.bundle.spec import SourceLocation, StringMatch
from starmesh.compiler.args import ArgChecker, Bound
from starmesh.compiler.builtins import BUILTINS
from starmesh.compiler.calls import Call
from starmesh.compiler.convert import Converter
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.reporter import INVALID, Reporter, describe


def call(builtin: str, *args: Any, line: int = 1, col: int = 1, via: tuple[str, ...] = (), **kwargs: Any) -> Call:
    return Call(builtin, args, kwargs, SourceLocation(file="mesh.star", line=line, col=col), via)


def check(c: Call) -> tuple[Bound, list[Finding]]:
    reporter = Reporter()
    bound = ArgChecker(reporter, Converter(reporter).convert).check_call(c)
    return bound, reporter.findings


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def only(findings: list[Finding], code: str) -> Finding:
    assert codes(findings) == [code], [f.concise() for f in findings]
    return findings[0]


# -- binding ---------------------------------------------------------------------------


def test_positional_and_keyword_bind_with_defaults_filled() -> None:
    bound, findings = check(call("service", "reviews", port=9080))
    assert findings == []
    assert bound.complete
    assert bound.values["name"] == "reviews"
    assert bound.values["port"] == 9080
    assert bound.values["versions"] == ("v1",)
    assert bound.values["timeout"] is None


def test_unknown_argument_suggests_the_closest_and_lists_all() -> None:
    bound, findings = check(call("service", "reviews", tmeout="2s", line=4, col=3))
    f = only(findings, "SM201")
    assert not bound.complete
    assert (f.line, f.col) == (4, 3)
    assert "unknown argument `tmeout`" in f.message
    assert f.hint is not None and "did you mean `timeout`?" in f.hint
    assert "name, port, versions, timeout" in f.hint


def test_unknown_argument_without_a_close_name_still_lists_the_valid_ones() -> None:
    _, findings = check(call("circuit_breaker", zzz=1))
    f = only(findings, "SM201")
    assert f.hint == "circuit_breaker() takes: max_connections, max_pending_requests, max_requests"


def test_missing_required_argument() -> None:
    _, findings = check(call("service", port=9080))
    f = only(findings, "SM202")
    assert "missing required argument `name`" in f.message


def test_too_many_positional_arguments() -> None:
    _, findings = check(call("service", "reviews", 9080))
    f = only(findings, "SM202")
    assert "takes 1 positional argument(s) (name), got 2" in f.message


def test_positional_only_where_allowed() -> None:
    _, findings = check(call("retries", 3))
    assert codes(findings) == ["SM202"]


def test_argument_given_by_position_and_by_name() -> None:
    _, findings = check(call("service", "reviews", name="ratings"))
    assert "given twice" in only(findings, "SM202").message


def test_every_default_in_the_table_passes_its_own_check() -> None:
    for builtin in BUILTINS.values():
        required = {p.name: _sample(p.kind) for p in builtin.params if p.required}
        bound, findings = check(call(builtin.name, **required))
        assert findings == [], (builtin.name, [f.concise() for f in findings])
        assert bound.complete


def _sample(kind: str) -> Any:
    return {
        "name": "reviews",
        "string": "x",
        "positive_number": 10,
        "regex": "^x$",
        "list[value:rule]": [call("rule")],
        "list[value:allow]": [call("allow")],
    }[kind]


# -- types -----------------------------------------------------------------------------


def test_wrong_type_says_expected_and_got() -> None:
    _, findings = check(call("service", "reviews", port="80"))
    f = only(findings, "SM203")
    assert f.message == 'service(port): must be an int, got string "80"'
    assert f.hint == "write the number without quotes: 80"


@pytest.mark.parametrize(
    ("builtin", "kwargs"),
    [
        ("service", {"port": True}),  # bools are not ints
        ("service", {"port": 80.5}),
        ("service", {"versions": "v1"}),
        ("service", {"versions": ["v1", 2]}),
        ("service", {"timeout": 2}),
        ("service", {"load_balancer": 1}),
        ("service", {"endpoints": ["127.0.0.1:80"]}),
        ("service", {"endpoints": {"v1": "127.0.0.1:80"}}),
        ("access_log", {"enabled": 1}),
        ("tracing", {"sample_percent": "5"}),
        ("tracing", {"sample_percent": False}),
        ("tracing", {"sample_percent": float("nan")}),
        ("match", {"headers": {"x": 1}}),
        ("match", {"headers": {1: "x"}}),
        ("rule", {"set_request_headers": ["x"]}),
        ("request_test", {"allowed": "yes"}),
        ("request_test", {"backends": 100}),
        ("rule", {"backends": {"v1": "100"}}),
    ],
)
def test_wrong_types(builtin: str, kwargs: dict[str, Any]) -> None:
    required = {"service": ("reviews",), "request_test": ("t",)}.get(builtin, ())
    extra: dict[str, Any] = {"service": "reviews"} if builtin == "request_test" else {}
    _, findings = check(call(builtin, *required, **extra, **kwargs))
    only(findings, "SM203")


def test_none_is_accepted_only_where_the_default_is_none() -> None:
    assert check(call("service", "reviews", timeout=None))[1] == []
    only(check(call("service", "reviews", port=None))[1], "SM203")


def test_integral_floats_become_ints() -> None:
    bound, findings = check(call("service", "reviews", port=9080.0))
    assert findings == []
    assert bound.values["port"] == 9080 and isinstance(bound.values["port"], int)
    bound, _ = check(call("tracing", sample_percent=5.0))
    assert isinstance(bound.values["sample_percent"], int)
    bound, _ = check(call("tracing", sample_percent=0.5))
    assert bound.values["sample_percent"] == 0.5


def test_nested_call_of_the_wrong_builtin_is_a_type_error_at_the_holder() -> None:
    _, findings = check(call("service", "reviews", retries=call("circuit_breaker", line=7), line=3))
    f = only(findings, "SM203")
    assert f.message == "service(retries): must be retries(...), got circuit_breaker(...)"
    assert f.line == 3


def test_nested_call_problems_are_reported_at_the_nested_call() -> None:
    inner = call("retries", attempts="3", line=7, col=15)
    bound, findings = check(call("service", "reviews", retries=inner, line=3))
    f = only(findings, "SM203")
    assert (f.line, f.col) == (7, 15)
    assert f.message.startswith("retries(attempts):")
    assert bound.values["retries"] is INVALID
    assert not bound.complete


def test_list_items_and_dict_entries_are_named_in_messages() -> None:
    _, findings = check(call("service", "reviews", versions=["v1", "V 2"]))
    assert only(findings, "SM209").message.startswith("service(versions[1]): invalid name")
    _, findings = check(call("service", "reviews", endpoints={"v1": ["127.0.0.1:80", "nope"]}))
    assert only(findings, "SM209").message.startswith('service(endpoints["v1"][1]): invalid endpoint')


def test_macro_calls_say_which_macro() -> None:
    _, findings = check(call("service", "reviews", port="x", via=("canary",)))
    assert only(findings, "SM203").message.endswith("(in canary)")


# -- values ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2 s", "1.5s", "2", "", "1m30s"])
def test_invalid_durations(text: str) -> None:
    _, findings = check(call("service", "reviews", timeout=text))
    f = only(findings, "SM204")
    assert f.message == f"service(timeout): invalid duration {describe(text).removeprefix('string ')}"
    assert f.hint == 'durations are an integer with ms, s, m or h, e.g. "250ms", "2s"'


@pytest.mark.parametrize("text", ["0s", "0ms", "25h", "1441m", "86400001ms"])
def test_durations_out_of_range(text: str) -> None:
    _, findings = check(call("service", "reviews", timeout=text))
    assert "out of range" in only(findings, "SM204").message


def test_durations_in_range_and_zero_where_allowed() -> None:
    assert check(call("service", "reviews", timeout="1ms"))[0].values["timeout"] == 1
    assert check(call("service", "reviews", timeout="24h"))[0].values["timeout"] == 86_400_000
    bound, findings = check(call("rollout", bake="0s"))
    assert findings == [] and bound.values["bake"] == 0


def test_invalid_regex_in_path_regex_and_regex_call() -> None:
    _, findings = check(call("match", path_regex="(", line=2))
    f = only(findings, "SM205")
    assert f.line == 2 and "invalid regex" in f.message
    inner = call("regex", "[a-", line=9, col=20)
    _, findings = check(call("match", headers={"x": inner}, line=2))
    f = only(findings, "SM205")
    assert (f.line, f.col) == (9, 20)


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        ({"v1": 90, "v2": 20}, "sum to 110"),
        ({"v1": 50}, "sum to 50"),
        ({}, "no backends"),
        ({"v1": 101, "v2": -1}, "from 0 to 100"),
        ({"v1": 50.5, "v2": 49.5}, "integers"),
    ],
)
def test_backend_weights(weights: dict[str, Any], fragment: str) -> None:
    _, findings = check(call("rule", backends=weights))
    assert set(codes(findings)) == {"SM206"}
    assert any(fragment in f.message for f in findings)


def test_good_backend_weights() -> None:
    bound, findings = check(call("rule", backends={"v1": 90.0, "v2": 10, "v3": 0}))
    assert findings == []
    assert bound.values["backends"] == {"v1": 90, "v2": 10, "v3": 0}


def test_request_test_backends_shorthand_and_shares() -> None:
    assert check(call("request_test", "t", service="r", backends="v2"))[0].values["backends"] == {"v2": 100}
    bound, findings = check(call("request_test", "t", service="r", backends={"v1": 33.5, "v2": 66.5}))
    assert findings == [] and bound.values["backends"] == {"v1": 33.5, "v2": 66.5}
    only(check(call("request_test", "t", service="r", backends={"v1": 33.5}))[1], "SM206")


@pytest.mark.parametrize(
    ("builtin", "kwargs"),
    [
        ("service", {"port": 0}),
        ("service", {"port": 65536}),
        ("tracing", {"sample_percent": 101}),
        ("tracing", {"sample_percent": -0.5}),
        ("retries", {"attempts": 11}),
        ("retries", {"budget_percent": 200}),
        ("circuit_breaker", {"max_requests": 0}),
        ("circuit_breaker", {"max_requests": 2**40}),
        ("outlier_detection", {"consecutive_5xx": 0}),
        ("rate_limit", {"requests_per_second": 0}),
        ("rate_limit", {"requests_per_second": -1}),
        ("rate_limit", {"requests_per_second": 10, "burst": 0}),
        ("access_log", {"max_lines_per_second": -1}),
        ("fault", {"abort_status": 99}),
        ("fault", {"abort_status": 150}),
        ("fault", {"abort_status": 600}),
        ("request_test", {"status": 700}),
        ("mirror", {"version": "v2", "percent": 101}),
    ],
)
def test_out_of_range(builtin: str, kwargs: dict[str, Any]) -> None:
    positional = {"service": ("reviews",), "request_test": ("t",)}.get(builtin, ())
    extra: dict[str, Any] = {"service": "reviews"} if builtin == "request_test" else {}
    _, findings = check(call(builtin, *positional, **extra, **kwargs))
    assert "SM207" in codes(findings), [f.concise() for f in findings]


@pytest.mark.parametrize(
    ("builtin", "kwargs"),
    [
        ("mesh", {"name": "m", "mtls": "strictly"}),
        ("service", {"name": "r", "mtls": "off"}),
        ("service", {"name": "r", "load_balancer": "least_requests"}),
        ("authorization", {"service": "r", "rules": [], "mode": "dry-run"}),
        ("retries", {"on": ["5xx", "gateway-error"]}),
    ],
)
def test_enum_choices(builtin: str, kwargs: dict[str, Any]) -> None:
    _, findings = check(call(builtin, **kwargs))
    f = only(findings, "SM208")
    assert f.hint is not None and "choose one of" in f.hint


def test_enum_suggests_the_closest_choice() -> None:
    _, findings = check(call("service", "r", load_balancer="least_requests"))
    assert only(findings, "SM208").message == (
        'service(load_balancer): "least_requests" is not one of "round_robin", "least_request", "random"'
    )
    assert findings[0].hint == 'did you mean "least_request"? choose one of "round_robin", "least_request", "random"'


@pytest.mark.parametrize(
    ("builtin", "kwargs"),
    [
        ("service", {"name": "Reviews"}),
        ("service", {"name": "reviews_v2"}),
        ("service", {"name": "-reviews"}),
        ("service", {"name": "a" * 64}),
        ("service", {"name": ""}),
        ("service", {"name": "r", "versions": ["V1"]}),
        ("service", {"name": "r", "endpoints": {"v1": ["localhost"]}}),
        ("service", {"name": "r", "endpoints": {"v1": ["localhost:0"]}}),
        ("service", {"name": "r", "endpoints": {"v1": ["local host:80"]}}),
        ("mesh", {"name": "m", "trust_domain": "Cluster Local"}),
        ("match", {"path_prefix": "api/"}),
        ("match", {"path_exact": "/a?b=1"}),
        ("match", {"path_exact": "/a b"}),
        ("match", {"path_prefix": "/api/*"}),
        ("match", {"methods": ["FETCH"]}),
        ("match", {"headers": {"x user": "a"}}),
        ("match", {"headers": {"x:user": "a"}}),
        ("rule", {"set_request_headers": {"x-a": "b\r\nx-evil: 1"}}),
        ("rule", {"remove_request_headers": ["bad header"]}),
        ("allow", {"paths": ["/a/*/b"]}),
        ("allow", {"sources": ["Product Page"]}),
        ("request_test", {"name": "t", "service": "r", "method": "FETCH"}),
        ("request_test", {"name": "t", "service": "r", "path": "index.html"}),
        ("mirror", {"version": "V3"}),
    ],
)
def test_invalid_names_paths_methods_headers_endpoints(builtin: str, kwargs: dict[str, Any]) -> None:
    _, findings = check(call(builtin, **kwargs))
    f = only(findings, "SM209")
    assert f.hint


def test_text_values_are_normalized() -> None:
    bound, findings = check(
        call("match", methods=["get", "Post"], headers={"End-User": "Jason", "X-Id": call("present")})
    )
    assert findings == []
    assert bound.values["methods"] == ("GET", "POST")
    assert bound.values["headers"] == {
        "end-user": StringMatch(kind="exact", value="Jason"),  # values stay case-sensitive
        "x-id": StringMatch(kind="present"),
    }
    bound, findings = check(call("request_test", "t", service="r", path="/a?b=1", method="post"))
    assert findings == [] and bound.values["method"] == "POST" and bound.values["path"] == "/a?b=1"
    bound, findings = check(call("service", "r", endpoints={"v1": ["[::1]:9081", "app.local:80"]}))
    assert findings == [] and bound.values["endpoints"] == {"v1": ("[::1]:9081", "app.local:80")}


def test_header_names_differing_only_in_case_conflict() -> None:
    _, findings = check(call("match", headers={"X-User": "a", "x-user": "b"}))
    assert "same name" in only(findings, "SM210").message


def test_header_value_must_be_string_regex_or_present() -> None:
    _, findings = check(call("match", headers={"x": call("retries")}))
    assert 'regex("...") or present()' in only(findings, "SM203").message


def test_every_problem_in_one_call_is_reported_once() -> None:
    _, findings = check(call("service", "Bad_Name", port="80", timeout="2 s", load_balancer="x", colour="red"))
    assert sorted(codes(findings)) == ["SM201", "SM203", "SM204", "SM208", "SM209"]
