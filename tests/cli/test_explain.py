"""`starmesh explain`: the trace (rules tried, the winner's file:line), the settings, the
authorization with its why, the proxy's own answers (404 no-route, fault, 403), text and
JSON, and the exit codes for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from starmesh.bundle.decide import DecisionTable, RequestInfo
from starmesh.cli.main import main
from starmesh.compiler.compile import compile_tree

POLICY = """\
mesh(name = "shop", mtls = "strict")

service(name = "productpage")
service(name = "ratings")
service(
    name = "reviews",
    versions = ["v1", "v2", "v3"],
    timeout = "2s",
    rate_limit = rate_limit(10, burst = 20),
)

http_route("reviews", rules = [
    rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100}),
    rule(
        match = [match(path_prefix = "/chaos/")],
        fault = fault(abort_status = 503, abort_percent = 100),
        backends = {"v1": 100},
    ),
    rule(
        match = [match(path_prefix = "/reviews/", methods = ["GET"])],
        backends = {"v1": 90, "v3": 10},
        retries = retries(attempts = 2, per_try_timeout = "500ms"),
        mirror = mirror("v3", percent = 5),
    ),
])

authorization("reviews", rules = [
    allow(sources = ["productpage"], methods = ["GET"], paths = ["/reviews/*", "/chaos/*"]),
])
authorization("ratings", rules = [allow(sources = ["reviews"])], mode = "audit")
"""

DESIGN_KEYS = {
    "service", "request", "steps", "rule", "backends", "timeout", "retries", "fault", "mirror", "rate_limit",
    "authorization", "response",
}


def line_of(text: str, snippet: str) -> int:
    """The 1-based line of the only line holding `snippet`."""
    [line] = [i for i, row in enumerate(text.splitlines(), 1) if snippet in row]
    return line


JASON_RULE = line_of(POLICY, '"jason"')
CHAOS_RULE = line_of(POLICY, '"/chaos/"') - 1  # the rule( line above the match
REVIEWS_RULE = line_of(POLICY, 'path_prefix = "/reviews/"') - 1
REVIEWS_ALLOW = line_of(POLICY, 'allow(sources = ["productpage"]')
RATINGS_ALLOW = line_of(POLICY, 'allow(sources = ["reviews"])')


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "policy"
    root.mkdir()
    (root / "mesh.star").write_text(POLICY, encoding="utf-8")
    return root


def explain(runner: CliRunner, root: Path, *args: str) -> Result:
    return runner.invoke(main, ["explain", str(root), *args], catch_exceptions=False)


def explain_json(runner: CliRunner, root: Path, *args: str) -> dict[str, Any]:
    result = explain(runner, root, *args, "--format", "json")
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


# -- routing ------------------------------------------------------------------------------------


def test_matched_rule_has_its_file_line_and_the_rules_tried_before_it_say_why(runner: CliRunner, tree: Path) -> None:
    got = explain_json(runner, tree, "--service", "reviews", "--path", "/reviews/1", "--source", "productpage")

    assert got["steps"] == [
        {"rule": 0, "file": "mesh.star", "line": JASON_RULE, "matched": False,
         "why": 'header end-user is absent (wants "jason")'},
        {"rule": 1, "file": "mesh.star", "line": CHAOS_RULE, "matched": False,
         "why": "path /reviews/1 does not start with /chaos/"},
        {"rule": 2, "file": "mesh.star", "line": REVIEWS_RULE, "matched": True,
         "why": "path /reviews/1 starts with /reviews/ and method GET is one of GET"},
    ]
    assert got["rule"] == {"index": 2, "file": "mesh.star", "line": REVIEWS_RULE}
    assert got["backends"] == {"v1": 90, "v3": 10}
    assert got["timeout"] == "2s"  # the service's, the rule names none
    assert got["retries"] == {"attempts": 2, "per_try_timeout": "500ms", "on": ["5xx", "connect-failure", "reset"],
                              "budget_percent": 20}
    assert got["mirror"] == {"version": "v3", "percent": 5}
    assert got["fault"] is None
    assert got["rate_limit"] == {"requests_per_second": 10, "burst": 20}
    assert got["response"] is None
    assert got["mtls"] == "strict" and got["load_balancer"] == "round_robin"


def test_the_first_matching_rule_wins_and_later_rules_are_not_tried(runner: CliRunner, tree: Path) -> None:
    got = explain_json(runner, tree, "--service", "reviews", "--path", "/chaos/1", "-H", "End-User: jason")
    assert [(s["rule"], s["matched"]) for s in got["steps"]] == [(0, True)]
    assert got["backends"] == {"v2": 100} and got["fault"] is None
    assert got["request"]["headers"] == {"end-user": "jason"}


def test_no_matching_rule_is_the_proxys_404_no_route(runner: CliRunner, tree: Path) -> None:
    got = explain_json(runner, tree, "--service", "reviews", "--method", "POST", "--path", "/reviews/1")
    assert [s["matched"] for s in got["steps"]] == [False, False, False]
    assert got["steps"][2]["why"] == "method POST is not one of GET"
    assert (got["rule"], got["backends"], got["timeout"]) == (None, None, None)
    assert got["response"] == {"status": 404, "reason": "no-route"}

    text = explain(runner, tree, "--service", "reviews", "--path", "/other").stdout
    assert "  no rule matched\n" in text
    assert text.rstrip().endswith("→ the calling proxy answers 404 no-route")
    assert "backends:" not in text


def test_a_fault_that_aborts_every_request_is_the_proxys_answer(runner: CliRunner, tree: Path) -> None:
    args = ("--service", "reviews", "--path", "/chaos/monkey", "--source", "productpage")
    got = explain_json(runner, tree, *args)
    assert got["rule"]["index"] == 1
    assert got["fault"] == {"delay": None, "delay_percent": 0, "abort_status": 503, "abort_percent": 100}
    assert got["response"] == {"status": 503, "reason": "fault"}

    text = explain(runner, tree, *args).stdout
    assert "fault:             abort with 503 on 100% of requests\n" in text
    assert text.rstrip().endswith("→ the calling proxy answers 503 fault")


def test_a_service_without_http_route_goes_to_all_endpoints(runner: CliRunner, tree: Path) -> None:
    got = explain_json(runner, tree, "--service", "productpage", "--method", "DELETE", "--path", "/x")
    assert (got["steps"], got["rule"], got["backends"], got["response"]) == ([], None, {"v1": 100}, None)
    assert got["authorization"] == {
        "allowed": True, "mode": None, "rule": None, "would_deny": False,
        "why": "no authorization: every request is allowed",
    }
    text = explain(runner, tree, "--service", "productpage").stdout
    assert "no http_route: every request goes to all of the service's versions" in text
    assert text.rstrip().endswith("→ productpage v1 (100%)")


# -- authorization ------------------------------------------------------------------------------


def test_the_admitting_allow_is_named_with_why(runner: CliRunner, tree: Path) -> None:
    got = explain_json(runner, tree, "--service", "reviews", "--path", "/reviews/7", "--source", "productpage")
    assert got["authorization"] == {
        "allowed": True,
        "mode": "enforce",
        "rule": {"index": 0, "file": "mesh.star", "line": REVIEWS_ALLOW},
        "would_deny": False,
        "why": f"allow[0] (mesh.star:{REVIEWS_ALLOW}) admits source productpage, method GET, "
        "path /reviews/7 (under /reviews/*)",
    }


@pytest.mark.parametrize(
    ("args", "needs"),
    [
        (("--source", "ratings"), "needs source productpage (the request comes from ratings)"),
        ((), "needs source productpage (the request has no proven source)"),
        (("--source", "productpage", "--path", "/chaos/x", "--method", "delete"),
         "needs method GET (the request is DELETE)"),
        (("--source", "productpage", "--path", "/reviews"),
         "needs path /chaos/* or /reviews/* (the request is for /reviews)"),
    ],
)
def test_a_denial_says_why_each_allow_did_not_admit(
    runner: CliRunner, tree: Path, args: tuple[str, ...], needs: str
) -> None:
    got = explain_json(runner, tree, "--service", "reviews", "--path", "/reviews/1", *args)
    authz = got["authorization"]
    assert (authz["allowed"], authz["mode"], authz["rule"], authz["would_deny"]) == (False, "enforce", None, False)
    assert authz["why"] == f"no allow admits the request: allow[0] (mesh.star:{REVIEWS_ALLOW}) {needs}"
    if got["rule"] is not None and got["fault"] is None:
        assert got["response"] == {"status": 403, "reason": "denied"}


def test_denied_text_names_the_allow_and_the_receiving_proxys_answer(runner: CliRunner, tree: Path) -> None:
    text = explain(runner, tree, "--service", "reviews", "--path", "/reviews/1", "--source", "ratings").stdout
    assert "authorization (enforce): denied\n" in text
    assert f"  no allow admits the request: allow[0] (mesh.star:{REVIEWS_ALLOW}) needs source productpage" in text
    assert text.rstrip().endswith("→ the receiving proxy answers 403 denied")
    assert "strict mTLS" not in text  # the caller is named: it has a certificate

    anonymous = explain(runner, tree, "--service", "reviews", "--path", "/reviews/1").stdout
    assert "  note: reviews takes strict mTLS: a caller without a mesh certificate is refused before" in anonymous


def test_audit_mode_lets_a_would_be_denial_through_and_says_it_is_logged(runner: CliRunner, tree: Path) -> None:
    got = explain_json(runner, tree, "--service", "ratings", "--source", "productpage")
    assert got["response"] is None
    authz = got["authorization"]
    assert (authz["allowed"], authz["mode"], authz["rule"], authz["would_deny"]) == (True, "audit", None, True)
    assert authz["why"] == (
        "audit mode lets it through, logged as would_deny: enforcement would deny it; no allow admits the "
        f"request: allow[0] (mesh.star:{RATINGS_ALLOW}) needs source reviews (the request comes from productpage)"
    )
    admitted = explain_json(runner, tree, "--service", "ratings", "--source", "reviews")["authorization"]
    assert (admitted["allowed"], admitted["would_deny"]) == (True, False)
    assert admitted["why"] == f"allow[0] (mesh.star:{RATINGS_ALLOW}) admits source reviews"

    text = explain(runner, tree, "--service", "ratings", "--source", "productpage").stdout
    assert "authorization (audit): allowed (audit mode: enforcement would deny it)\n" in text
    assert text.rstrip().endswith("→ ratings v1 (100%) (audit: logged as would_deny)")


# -- text and JSON ------------------------------------------------------------------------------


def test_json_is_the_decision_engines_answer_with_the_designed_keys(runner: CliRunner, tree: Path) -> None:
    args = ["--service", "reviews", "--method", "get", "--path", "/reviews/1?page=2", "-H", "X-A: 1", "-H",
            "x-a:2", "--source", "productpage"]
    result = explain(runner, tree, *args, "--format", "json")
    assert result.exit_code == 0 and result.stderr == ""
    got = json.loads(result.stdout)

    spec = compile_tree(tree).bundle.spec  # type: ignore[union-attr]
    expected = DecisionTable.build(spec).explain(
        RequestInfo(service="reviews", method="get", path="/reviews/1?page=2", headers=(("X-A", "1"), ("x-a", "2")),
                    source="productpage")
    ).to_json()
    assert got == expected
    # The admin /explain's bytes: json.dumps(..., indent=2) and a newline.
    assert result.stdout == json.dumps(expected, indent=2, sort_keys=False) + "\n"
    assert DESIGN_KEYS <= set(got)
    assert {"allowed", "mode", "rule", "why"} <= set(got["authorization"])
    assert set(got["steps"][0]) == {"rule", "file", "line", "matched", "why"}
    assert got["request"] == {"method": "GET", "path": "/reviews/1?page=2", "headers": {"x-a": "1,2"},
                              "source": "productpage"}


def test_text_trace_snapshot(
    runner: CliRunner, tree: Path, monkeypatch: pytest.MonkeyPatch, assert_snapshot: Callable[[str, str], None]
) -> None:
    monkeypatch.chdir(tree)
    result = runner.invoke(
        main,
        ["explain", "--service", "reviews", "--path", "/reviews/1", "-H", "x-trace: on", "--source", "productpage"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0 and result.stderr == ""
    assert "\x1b[" not in result.stdout  # no colour without a terminal
    assert_snapshot("explain_text.txt", result.stdout)


def test_text_names_the_policy_root_when_run_from_elsewhere(runner: CliRunner, tree: Path) -> None:
    text = explain(runner, tree, "--service", "reviews", "--path", "/reviews/1", "--source", "productpage").stdout
    assert f"(policy files relative to {tree.as_posix()}/)" in text
    assert f"  ✗ rules[0] mesh.star:{JASON_RULE}: header end-user is absent" in text
    assert f"  matched rules[2] (mesh.star:{REVIEWS_RULE})\n" in text
    assert "backends:          v1 90%, v3 10%\n" in text
    assert "retries:           up to 2 retries, 500ms per try, on 5xx, connect-failure, reset, budget 20%\n" in text
    assert "mirror:            5% of requests copied to v3\n" in text
    assert "rate limit:        10 requests/s, burst 20\n" in text
    assert text.rstrip().endswith("→ reviews v1 (90%) or v3 (10%)")


def test_entry_picks_another_entry_file(runner: CliRunner, tree: Path) -> None:
    (tree / "mesh.star").rename(tree / "staging.star")
    got = explain_json(runner, tree, "--entry", "staging.star", "--service", "reviews", "-H", "end-user: jason")
    assert got["rule"] == {"index": 0, "file": "staging.star", "line": JASON_RULE}


def test_the_installed_command_prints_the_same_json(runner: CliRunner, tree: Path) -> None:
    args = ["explain", str(tree), "--service", "reviews", "--path", "/reviews/1", "--format", "json"]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("starmesh")), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == runner.invoke(main, args, catch_exceptions=False).stdout


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_service_exits_2_naming_the_declared_services(runner: CliRunner, tree: Path) -> None:
    result = explain(runner, tree, "--service", "reveiws")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "starmesh: error: unknown service 'reveiws': the policy declares productpage, ratings, reviews\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-H", "end-user jason"), "-H 'end-user jason' is not 'name: value'"),
        (("-H", ": jason"), "-H ': jason' is not 'name: value'"),
        (("-H", "bad name: x"), "-H 'bad name: x' is not 'name: value'"),
        (("--method", "GE T"), "--method 'GE T' is not an HTTP method"),
        (("--path", "reviews/1"), "--path 'reviews/1' must start with /"),
    ],
)
def test_malformed_request_options_exit_2_with_one_line(
    runner: CliRunner, tree: Path, args: tuple[str, ...], message: str
) -> None:
    result = explain(runner, tree, "--service", "reviews", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"starmesh: error: {message}")
    assert result.stderr.count("\n") == 1


def test_missing_service_option_is_a_usage_error(runner: CliRunner, tree: Path) -> None:
    result = explain(runner, tree)
    assert result.exit_code == 2
    assert "Missing option '--service'" in result.stderr


def test_missing_tree_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = explain(runner, tmp_path / "nowhere", "--service", "reviews")
    assert result.exit_code == 2
    assert result.stderr.startswith("starmesh: error: policy root ")


def test_policy_with_errors_prints_the_findings_and_exits_1(runner: CliRunner, tree: Path) -> None:
    broken = POLICY.replace('backends = {"v1": 90, "v3": 10}', 'backends = {"v1": 80, "v3": 10}')
    assert broken != POLICY
    (tree / "mesh.star").write_text(broken, encoding="utf-8")
    result = explain(runner, tree, "--service", "reviews")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"mesh.star:{REVIEWS_RULE}:5: SM206 error: " in result.stderr
    assert result.stderr.rstrip().endswith("Found 1 error and 0 warnings.")
