"""The shipped Starlark library (policies/*.star), compiled through the whole pipeline.

Each macro is used in a small policy; the test checks the Spec it produces and, for
misuse, that the macro's fail() message comes back as a finding at the user's line.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import pytest
import starlark

from starmesh.bundle.spec import (
    Allow,
    Authorization,
    CircuitBreaker,
    Match,
    Mirror,
    OutlierDetection,
    Retries,
    Rule,
    Spec,
    StringMatch,
)
from starmesh.compiler.compile import CompileResult, compile_tree

LIBRARY = Path(__file__).resolve().parents[2] / "policies"
MODULES = ("traffic.star", "resilience.star", "security.star")

PRELUDE = """\
load("@starmesh//traffic.star", "ab_test", "blue_green", "canary", "dark_launch", "header_route", "header_rule", "mirror_traffic", "weighted")
load("@starmesh//resilience.star", "retries_for_idempotent", "retries_for_non_idempotent", "standard_protection", "standard_resilience")
load("@starmesh//security.star", "allow_all", "allow_from", "deny_all", "read_only")
mesh(name = "test")
service(name = "productpage")
service(name = "ratings")
service(name = "reviews", versions = ["v1", "v2", "v3"])
"""
PRELUDE_LINES = PRELUDE.count("\n")


def compile_policy(tmp_path: Path, body: str) -> CompileResult:
    (tmp_path / "mesh.star").write_text(PRELUDE + body, encoding="utf-8")
    return compile_tree(tmp_path)


def spec_of(tmp_path: Path, body: str) -> Spec:
    result = compile_policy(tmp_path, body)
    errors = [f.concise() for f in result.findings if f.severity == "error"]
    assert not errors, "\n".join(errors)
    assert result.bundle is not None
    return result.bundle.spec


def assert_fails(tmp_path: Path, body: str, message: str) -> None:
    """The policy does not compile, and the macro's message is reported at the call."""
    result = compile_policy(tmp_path, body)
    assert result.bundle is None
    matching = [f for f in result.findings if message in f.message]
    assert matching, "\n".join(f.concise() for f in result.findings)
    finding = matching[0]
    assert finding.severity == "error"
    assert (finding.file, finding.line) == ("mesh.star", PRELUDE_LINES + 1), finding.concise()


def header(name: str, value: str) -> Match:
    return Match(headers={name: StringMatch(kind="exact", value=value)})


# -- The files themselves ----------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_module_parses_and_ships_in_the_package(module: str) -> None:
    text = (LIBRARY / module).read_text(encoding="utf-8")
    starlark.parse(module, text)
    shipped = importlib.resources.files("starmesh.policies").joinpath(module)
    assert shipped.is_file()
    assert shipped.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("module", MODULES)
def test_every_public_function_has_a_docstring_with_returns(module: str) -> None:
    text = (LIBRARY / module).read_text(encoding="utf-8")
    public = re.findall(r"^def ([a-z][a-z0-9_]*)\(", text, re.MULTILINE)
    assert public
    for name in public:
        body = re.search(rf'^def {name}\(.*?\):\n    """(.*?)"""', text, re.MULTILINE | re.DOTALL)
        assert body is not None, f"{module}: {name}() has no docstring"
        assert "Returns:" in body.group(1), f"{module}: {name}() does not document what it returns"


# -- traffic.star -------------------------------------------------------------------------


def test_canary_splits_by_percent(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'canary("reviews", stable = "v1", canary = "v2", percent = 10)\n')
    assert spec.routes["reviews"] == (Rule(backends={"v1": 90, "v2": 10}),)


def test_canary_at_0_percent_keeps_the_canary_drained(tmp_path: Path) -> None:
    result = compile_policy(
        tmp_path,
        'canary("reviews", stable = "v1", canary = "v2", percent = 0, overrides = [header_rule("x-t", "1", "v3")])\n'
        'request_test("stable", service = "reviews", backends = "v1")\n',
    )
    assert result.bundle is not None, [f.concise() for f in result.findings]
    assert result.bundle.spec.routes["reviews"][-1] == Rule(backends={"v1": 100, "v2": 0})
    assert "SM409" not in {f.code for f in result.findings}, "a 0% canary is drained on purpose"


def test_canary_at_100_percent(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'canary("reviews", stable = "v1", canary = "v2", percent = 100)\n')
    assert spec.routes["reviews"] == (Rule(backends={"v1": 0, "v2": 100}),)


def test_canary_with_match_and_overrides(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'canary("reviews", stable = "v1", canary = "v3", percent = 25,\n'
        '       match = match(headers = {"x-region": "eu"}),\n'
        '       overrides = [header_rule("end-user", "jason", "v2")])\n',
    )
    assert spec.routes["reviews"] == (
        Rule(match=(header("end-user", "jason"),), backends={"v2": 100}),
        Rule(match=(header("x-region", "eu"),), backends={"v1": 75, "v3": 25}),
        Rule(backends={"v1": 100}),
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('canary("reviews", stable = "v1", canary = "v2", percent = 101)', "percent must be an integer from 0 to 100"),
        ('canary("reviews", stable = "v1", canary = "v2", percent = 12.5)', "percent must be an integer from 0 to 100"),
        ('canary("reviews", stable = "v1", canary = "v1", percent = 10)', "stable and canary are both"),
        ('canary("reviews", stable = "", canary = "v1", percent = 10)', "stable must be a non-empty string"),
    ],
)
def test_canary_misuse(tmp_path: Path, call: str, message: str) -> None:
    assert_fails(tmp_path, call + "\n", message)


def test_canary_version_must_exist(tmp_path: Path) -> None:
    result = compile_policy(tmp_path, 'canary("reviews", stable = "v1", canary = "v9", percent = 10)\n')
    unknown = [f for f in result.findings if f.code == "SM304"]
    assert unknown and unknown[0].line == PRELUDE_LINES + 1


def test_blue_green_sends_everything_to_active(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'blue_green("reviews", active = "v2")\n')
    assert spec.routes["reviews"] == (Rule(backends={"v2": 100}),)


def test_blue_green_preview_by_header(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'blue_green("reviews", active = "v1", preview = "v2", preview_header = "X-Green")\n'
        'request_test("preview", service = "reviews", headers = {"x-green": "1"}, backends = "v2")\n'
        'request_test("active", service = "reviews", backends = "v1")\n',
    )
    preview, active = spec.routes["reviews"]
    assert preview.backends == {"v2": 100}
    assert preview.match == (Match(headers={"x-green": StringMatch(kind="present")}),)
    assert active == Rule(backends={"v1": 100})


def test_blue_green_preview_header_needs_preview(tmp_path: Path) -> None:
    assert_fails(tmp_path, 'blue_green("reviews", active = "v1", preview_header = "x-green")\n', "preview_header is set but preview is not")


def test_ab_test_routes_by_header(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'ab_test("reviews", header = "x-variant", value = "b", variant = "v2", default = "v1")\n'
        'request_test("b", service = "reviews", headers = {"x-variant": "b"}, backends = "v2")\n'
        'request_test("a", service = "reviews", headers = {"x-variant": "a"}, backends = "v1")\n',
    )
    assert spec.routes["reviews"] == (
        Rule(match=(header("x-variant", "b"),), backends={"v2": 100}),
        Rule(backends={"v1": 100}),
    )


def test_ab_test_with_a_regex_on_the_cookie(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'ab_test("reviews", header = "cookie", value = regex("^(.*; )?variant=b(;.*)?$"), variant = "v3", default = "v1")\n'
        'request_test("b", service = "reviews", headers = {"cookie": "id=1; variant=b"}, backends = "v3")\n',
    )
    first = spec.routes["reviews"][0]
    assert first.match[0].headers["cookie"].kind == "regex"


def test_ab_test_misuse(tmp_path: Path) -> None:
    assert_fails(
        tmp_path,
        'ab_test("reviews", header = "x-variant", value = "b", variant = "v1", default = "v1")\n',
        "variant and default are both",
    )


def test_header_route_keeps_the_order_written(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'header_route("reviews", "x-tier", {"gold": "v3", "beta": "v2"}, "v1")\n')
    assert spec.routes["reviews"] == (
        Rule(match=(header("x-tier", "gold"),), backends={"v3": 100}),
        Rule(match=(header("x-tier", "beta"),), backends={"v2": 100}),
        Rule(backends={"v1": 100}),
    )


def test_header_route_needs_routes(tmp_path: Path) -> None:
    assert_fails(tmp_path, 'header_route("reviews", "x-tier", {}, "v1")\n', "routes must be a non-empty dict")


def test_dark_launch_by_header_presence(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'dark_launch("reviews", version = "v3", default = "v1")\n'
        'request_test("insider", service = "reviews", headers = {"x-dark-launch": "yes"}, backends = "v3")\n'
        'request_test("everyone", service = "reviews", backends = "v1")\n',
    )
    assert spec.routes["reviews"][0].match == (Match(headers={"x-dark-launch": StringMatch(kind="present")}),)


def test_mirror_traffic(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'mirror_traffic("reviews", primary = "v1", shadow = "v2", percent = 10)\n')
    assert spec.routes["reviews"] == (Rule(backends={"v1": 100}, mirror=Mirror(version="v2", percent=10)),)


def test_mirror_traffic_to_itself_fails(tmp_path: Path) -> None:
    assert_fails(tmp_path, 'mirror_traffic("reviews", primary = "v1", shadow = "v1")\n', "primary and shadow are both")


def test_weighted(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'weighted("reviews", {"v1": 50, "v2": 30, "v3": 20})\n')
    assert spec.routes["reviews"] == (Rule(backends={"v1": 50, "v2": 30, "v3": 20}),)


def test_weighted_keeps_drained_versions(tmp_path: Path) -> None:
    result = compile_policy(tmp_path, 'weighted("reviews", {"v1": 100, "v2": 0, "v3": 0})\n')
    assert result.bundle is not None
    assert result.bundle.spec.routes["reviews"] == (Rule(backends={"v1": 100, "v2": 0, "v3": 0}),)
    assert [f.concise() for f in result.findings] == []


def test_weighted_must_sum_to_100(tmp_path: Path) -> None:
    assert_fails(tmp_path, 'weighted("reviews", {"v1": 50, "v2": 30})\n', "weights must sum to 100, got 80")


def test_macros_return_the_declared_route(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        "def declare():\n"
        '    route = canary("reviews", stable = "v1", canary = "v2", percent = 10)\n'
        "    if route == None:\n"
        '        fail("canary returned None")\n'
        "declare()\n",
    )
    assert "reviews" in spec.routes


# -- resilience.star ----------------------------------------------------------------------


def test_standard_resilience_fits_tries_in_the_timeout(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'service(name = "details", **standard_resilience("1s"))\n')
    details = spec.services["details"]
    assert details.timeout_ms == 1000
    assert details.retries == Retries(attempts=2, per_try_timeout_ms=333)


def test_standard_resilience_and_protection_combine(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'service(name = "details", **(standard_resilience("2s", attempts = 1, per_try_timeout = "500ms")'
        " | standard_protection(max_requests = 100, consecutive_5xx = 3)))\n",
    )
    details = spec.services["details"]
    assert details.timeout_ms == 2000
    assert details.retries == Retries(attempts=1, per_try_timeout_ms=500)
    assert details.circuit_breaker == CircuitBreaker(max_requests=100)
    assert details.outlier_detection == OutlierDetection(consecutive_5xx=3)


def test_standard_resilience_without_retries(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'service(name = "details", **standard_resilience("3s", attempts = 0))\n')
    assert spec.services["details"].timeout_ms == 3000
    assert spec.services["details"].retries is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('standard_resilience("soon")', "timeout must be a duration"),
        ('standard_resilience("1s", per_try_timeout = "1s")', "per_try_timeout \"1s\" must be shorter than timeout"),
        ('standard_resilience("1s", attempts = 11)', "attempts must be an integer from 0 to 10"),
        ("standard_protection(max_requests = 0)", "max_requests must be a positive integer"),
    ],
)
def test_resilience_misuse(tmp_path: Path, call: str, message: str) -> None:
    assert_fails(tmp_path, f'service(name = "details", **{call})\n', message)


def test_retry_presets(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'service(name = "reads", timeout = "1s", retries = retries_for_idempotent("200ms"))\n'
        'service(name = "writes", timeout = "1s", retries = retries_for_non_idempotent("200ms", attempts = 1))\n',
    )
    assert spec.services["reads"].retries == Retries(attempts=2, per_try_timeout_ms=200)
    assert spec.services["writes"].retries == Retries(attempts=1, per_try_timeout_ms=200, on=("connect-failure",))


# -- security.star ------------------------------------------------------------------------


def test_allow_from(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'allow_from("ratings", sources = ["reviews"], methods = ["GET"], paths = ["/ratings/*"])\n'
        'request_test("reviews reads", service = "ratings", source = "reviews", path = "/ratings/1", allowed = True)\n'
        'request_test("reviews cannot write", service = "ratings", source = "reviews", method = "POST",'
        ' path = "/ratings/1", allowed = False, status = 403)\n'
        'request_test("others cannot read", service = "ratings", source = "productpage", path = "/ratings/1",'
        " allowed = False)\n",
    )
    assert spec.authorization["ratings"] == Authorization(
        rules=(Allow(sources=("reviews",), methods=("GET",), paths=("/ratings/*",)),)
    )


def test_allow_from_needs_sources(tmp_path: Path) -> None:
    assert_fails(tmp_path, 'allow_from("ratings", sources = [])\n', "sources must be a non-empty list")


def test_read_only(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'read_only("ratings", sources = ["reviews"])\n')
    assert spec.authorization["ratings"] == Authorization(rules=(Allow(sources=("reviews",), methods=("GET", "HEAD")),))


def test_deny_all_and_allow_all(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        'deny_all("ratings")\n'
        'allow_all("reviews")\n'
        'request_test("nobody", service = "ratings", source = "reviews", allowed = False, status = 403)\n'
        'request_test("anybody", service = "reviews", allowed = True)\n',
    )
    assert spec.authorization["ratings"] == Authorization(rules=())
    assert spec.authorization["reviews"] == Authorization(rules=(Allow(),))


def test_deny_all_in_audit_mode_is_flagged(tmp_path: Path) -> None:
    result = compile_policy(tmp_path, 'deny_all("ratings", mode = "audit")\n')
    assert result.bundle is not None
    assert result.bundle.spec.authorization["ratings"].mode == "audit"
    assert "SM407" in {f.code for f in result.findings}


def test_security_misuse(tmp_path: Path) -> None:
    assert_fails(tmp_path, 'deny_all("ratings", mode = "log")\n', 'mode must be "enforce" or "audit"')
