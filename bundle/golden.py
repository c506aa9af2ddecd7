"""Golden requests: a policy repo's `request_test`s checked against a decision table.

Each test is explained with the same engine the proxy uses, then its expectations are
compared (DESIGN.md, "Findings"):
- `backends` ("v2" means {"v2": 100}): the request must reach an app (the proxy does
  not answer it itself) with exactly these shares; versions with weight 0 are ignored.
  A rule without backends shares equally over the declared versions.
- `allowed`: the authorization decision (always true in audit mode).
- `status`: the answer the proxy itself gives: 404 `no-route`, 403 `denied`, a fault
  status when the rule aborts 100% of requests. 429 cannot be decided per request;
  it is satisfied when the service has a `rate_limit` (the request may be limited).
  Expecting a status for a request the proxy forwards is a failure: give `backends`
  to assert that a request reaches an app.
A test for a service the bundle does not declare fails.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starmesh.bundle.explain import Decision, RequestInfo
from starmesh.bundle.spec import RequestTest

if TYPE_CHECKING:
    from starmesh.bundle.decide import DecisionTable

__all__ = ["RequestTestFailure", "check_request_test", "run_request_tests"]


@dataclass(frozen=True, slots=True)
class RequestTestFailure:
    """A golden request whose outcome differs from its expectations."""

    test: RequestTest
    message: str

    @property
    def location_key(self) -> str:
        """The test's key in `Spec.source_map`: `request_test/<name>`."""
        return f"request_test/{self.test.name}"


def _shares(backends: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in backends.items() if v}


def _show(backends: Mapping[str, float]) -> str:
    return json.dumps({k: (int(v) if float(v).is_integer() else v) for k, v in backends.items()}, sort_keys=True)


def _where(decision: Decision) -> str:
    rule = decision.rule
    if rule is None:
        return "no rule matched"
    if rule.index is None:
        return f"service {decision.service.name} has no http_route: all endpoints"
    loc = rule.location
    return f"rule {rule.index}" + ("" if loc is None else f" at {loc.file}:{loc.line}")


def _outcome(decision: Decision) -> str:
    if decision.response is not None:
        return f"the proxy answers {decision.response.status} {decision.response.reason}"
    return f"forwarded to {_show(decision.backends or {})}"


def _mismatches(test: RequestTest, decision: Decision) -> list[str]:
    problems: list[str] = []
    where = _where(decision)
    if test.backends is not None:
        expected = _show(test.backends)
        if decision.response is not None:
            problems.append(f"expected backends {expected}, but {_outcome(decision)} ({where})")
        elif _shares(test.backends) != _shares(decision.backends or {}):
            problems.append(f"expected backends {expected}, got {_show(decision.backends or {})} ({where})")
    if test.allowed is not None and test.allowed != decision.authorization.allowed:
        mode = decision.authorization.mode or "no authorization"
        got = "allowed" if decision.authorization.allowed else "denied"
        problems.append(f"expected allowed={str(test.allowed).lower()}, got {got} ({mode})")
    if test.status is not None:
        response = decision.response
        if response is not None:
            if response.status != test.status:
                problems.append(f"expected status {test.status}, got {response.status} {response.reason} ({where})")
        elif test.status == 429:
            if decision.service.rate_limit is None:
                problems.append(f"expected status 429, but service {decision.service.name} has no rate_limit")
        else:
            problems.append(
                f"expected status {test.status}, but {_outcome(decision)} ({where}); "
                "status is the answer the proxy itself gives: give backends to assert the request reaches an app"
            )
    return problems


def check_request_test(table: DecisionTable, test: RequestTest) -> RequestTestFailure | None:
    """Check one golden request; None when it passes."""
    if test.service not in table.services:
        return RequestTestFailure(test, f"request_test {json.dumps(test.name)}: unknown service {test.service!r}")
    request = RequestInfo(
        service=test.service, method=test.method, path=test.path, headers=dict(test.headers), source=test.source
    )
    problems = _mismatches(test, table.explain(request))
    if not problems:
        return None
    return RequestTestFailure(test, f"request_test {json.dumps(test.name)}: " + "; ".join(problems))


def run_request_tests(table: DecisionTable, tests: Sequence[RequestTest] | None = None) -> list[RequestTestFailure]:
    """Check golden requests (by default the spec's own) and return the failures, in order."""
    failures = []
    for test in table.spec.request_tests if tests is None else tests:
        failure = check_request_test(table, test)
        if failure is not None:
            failures.append(failure)
    return failures
