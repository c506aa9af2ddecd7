"""The decision trace behind `starmesh explain` and the proxy's `/explain`.

`explain_request` walks a prepared service's rules exactly as the proxy does (the same
`PreparedMatch.test` calls, the same first-match-wins order) and records a `Step` per
rule tried; rules after the winner are never evaluated, so they are not listed.

What `Decision.to_json()` reports (DESIGN.md, "Explain JSON"):
- `rule`: the winning rule (0-based index into the service's `http_route` rules, with
  its file and line), or null when no rule matched or the service has no `http_route`;
- `backends`: the winning rule's declared weights; when it names none (or the service
  has no `http_route`, meaning "all endpoints") an equal split over the service's
  declared versions, integers summing to 100 with the remainder to the first ones;
  null when no rule matched;
- durations are strings as in the policy language ("250ms", "2s", "1m");
- `authorization`: `{"allowed", "mode", "rule", "would_deny", "why"}`; `mode` is null
  for a service without authorization; `rule` is the admitting allow rule (`{"index",
  "file", "line"}`) or null. In audit mode `allowed` is true; `would_deny` (and `rule`
  null) then means enforcement would have denied it. `why` is a sentence: which allow
  admitted the request, or why each allow did not (`PreparedAllow.trace`);
- service-level settings the calling proxy applies whatever the rule: `load_balancer`,
  `circuit_breaker` (the declared caps, or the defaults the proxy uses when none are
  declared), `outlier_detection` (null when not declared) and `mtls` (the service's
  effective mode);
- `response`: set when the proxy itself would answer, in hop order: no matching rule
  is 404 `no-route` (as in Envoy and Istio), a fault that aborts 100% of requests is
  its status with reason `fault` (the calling side injects faults before the request
  leaves), an enforced denial is 403 `denied` (the receiving side). A fault with a
  smaller share is reported in `fault`, not as a response; the rate limit is not
  decided per request and is reported in `rate_limit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from starmesh.bundle.authz import ALLOW_ALL, AuthzDecision, PreparedAuthorization
from starmesh.bundle.match import RequestView, split_path
from starmesh.bundle.routes import PreparedRule, PreparedService
from starmesh.bundle.spec import CircuitBreaker, Fault, Mirror, OutlierDetection, RateLimit, Retries, SourceLocation

__all__ = [
    "Decision",
    "ProxyAnswer",
    "RequestInfo",
    "Step",
    "explain_request",
    "format_duration",
    "header_map",
]


class RequestInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A request to explain. `path` may carry a query string; `source` is the caller's
    proven identity (a service name), None when unauthenticated. Header names are
    case-insensitive; a repeated header's values are joined with "," (as HTTP does)."""

    service: str
    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] | dict[str, str] = ()
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One rule tried: did it match, and why (a short sentence)."""

    rule: int
    file: str | None
    line: int | None
    matched: bool
    why: str


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    """A response the proxy makes itself: status and `x-starmesh-error` reason."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The full decision for one request; `to_json()` gives DESIGN.md's explain JSON."""

    request: RequestInfo
    service: PreparedService
    steps: tuple[Step, ...]
    rule: PreparedRule | None
    """The rule that decides the request (the implicit catch-all without http_route)."""
    authorization: AuthzDecision
    authorization_why: str
    """Why the authorization decided as it did (`_authorization_why`)."""
    response: ProxyAnswer | None

    @property
    def backends(self) -> dict[str, int] | None:
        """The decided shares, or None when no rule matched."""
        return None if self.rule is None else dict(self.rule.shares)

    @property
    def rule_location(self) -> SourceLocation | None:
        return None if self.rule is None else self.rule.location

    def to_json(self) -> dict[str, Any]:
        rule = self.rule
        req = self.request
        return {
            "service": self.service.name,
            "request": {
                "method": req.method.upper(),
                "path": req.path,
                "headers": dict(sorted(header_map(req.headers).items())),
                "source": req.source,
            },
            "steps": [
                {"rule": s.rule, "file": s.file, "line": s.line, "matched": s.matched, "why": s.why} for s in self.steps
            ],
            "rule": None if rule is None or rule.index is None else _ref(rule.index, rule.location),
            "backends": self.backends,
            "timeout": None if rule is None else format_duration(rule.timeout_ms),
            "retries": None if rule is None else _retries(rule.retries),
            "fault": None if rule is None else _fault(rule.fault),
            "mirror": None if rule is None else _mirror(rule.mirror),
            "rate_limit": _rate_limit(self.service.rate_limit),
            "authorization": self._authorization(),
            "response": None if self.response is None else _answer(self.response),
            "load_balancer": self.service.spec.load_balancer,
            "circuit_breaker": _circuit_breaker(self.service.spec.circuit_breaker or CircuitBreaker()),
            "outlier_detection": _outlier_detection(self.service.spec.outlier_detection),
            "mtls": self.service.mtls,
        }

    def _authorization(self) -> dict[str, Any]:
        authz = self.authorization
        ref = None
        if authz.rule_index is not None and self.service.authorization is not None:
            ref = _ref(authz.rule_index, self.service.authorization.rules[authz.rule_index].location)
        return {
            "allowed": authz.allowed,
            "mode": authz.mode,
            "rule": ref,
            "would_deny": authz.would_deny,
            "why": self.authorization_why,
        }


def header_map(headers: tuple[tuple[str, str], ...] | dict[str, str]) -> dict[str, str]:
    """Lower-cased header names; repeated headers joined with ","."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def format_duration(ms: int | None) -> str | None:
    """Milliseconds as the policy language writes them: "250ms", "2s", "1m", "1h"."""
    if ms is None:
        return None
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _ref(index: int, where: SourceLocation | None) -> dict[str, Any]:
    if where is None:
        return {"index": index, "file": None, "line": None}
    return {"index": index, "file": where.file, "line": where.line}


def _answer(response: ProxyAnswer) -> dict[str, Any]:
    return {"status": response.status, "reason": response.reason}


def _retries(r: Retries | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "attempts": r.attempts,
        "per_try_timeout": format_duration(r.per_try_timeout_ms),
        "on": list(r.on),
        "budget_percent": r.budget_percent,
    }


def _fault(f: Fault | None) -> dict[str, Any] | None:
    if f is None:
        return None
    return {
        "delay": format_duration(f.delay_ms),
        "delay_percent": f.delay_percent,
        "abort_status": f.abort_status,
        "abort_percent": f.abort_percent,
    }


def _mirror(m: Mirror | None) -> dict[str, Any] | None:
    return None if m is None else {"version": m.version, "percent": m.percent}


def _rate_limit(r: RateLimit | None) -> dict[str, Any] | None:
    return None if r is None else {"requests_per_second": r.requests_per_second, "burst": r.burst}


def _circuit_breaker(c: CircuitBreaker) -> dict[str, Any]:
    return {
        "max_connections": c.max_connections,
        "max_pending_requests": c.max_pending_requests,
        "max_requests": c.max_requests,
    }


def _outlier_detection(o: OutlierDetection | None) -> dict[str, Any] | None:
    if o is None:
        return None
    return {
        "consecutive_5xx": o.consecutive_5xx,
        "interval": format_duration(o.interval_ms),
        "base_ejection_time": format_duration(o.base_ejection_time_ms),
        "max_ejection_percent": o.max_ejection_percent,
    }


def _where(location: SourceLocation | None) -> str:
    return "" if location is None else f" ({location.file}:{location.line})"


def _authorization_why(
    authz: PreparedAuthorization | None, decision: AuthzDecision, source: str | None, method: str, path: str
) -> str:
    """Which allow admitted the request, or why each allow did not (the same `admits`
    the decision used, through `PreparedAllow.trace`)."""
    if authz is None:
        return "no authorization: every request is allowed"
    if decision.rule_index is not None:
        allow = authz.rules[decision.rule_index]
        _, held = allow.trace(source, method, path)
        return f"allow[{allow.index}]{_where(allow.location)} admits {held}"
    if authz.rules:
        reasons = "; ".join(
            f"allow[{allow.index}]{_where(allow.location)} {allow.trace(source, method, path)[1]}"
            for allow in authz.rules
        )
        denial = f"no allow admits the request: {reasons}"
    else:
        denial = "the authorization has no allow rules, so it admits nothing"
    if decision.would_deny:
        return f"audit mode lets it through, logged as would_deny: enforcement would deny it; {denial}"
    return denial


def _trace_rule(rule: PreparedRule, req: RequestView) -> Step:
    """The same decision as `PreparedRule.applies`, with the reason."""
    assert rule.index is not None
    file = None if rule.location is None else rule.location.file
    line = None if rule.location is None else rule.location.line
    if not rule.matches:
        return Step(rule.index, file, line, True, "the rule has no match: it matches every request")
    reasons = []
    for i, match in enumerate(rule.matches):
        held, why = match.trace(req)
        if held:
            return Step(rule.index, file, line, True, why)
        reasons.append(why if len(rule.matches) == 1 else f"match {i}: {why}")
    return Step(rule.index, file, line, False, "; ".join(reasons))


def explain_request(service: PreparedService, request: RequestInfo) -> Decision:
    """Decide `request` against a prepared service and record why."""
    path, query = split_path(request.path)
    method = request.method.upper()
    req = RequestView(method, path, header_map(request.headers), query)
    steps: list[Step] = []
    winner: PreparedRule | None = None
    if not service.has_routes:
        winner = service.rules[0]
    else:
        for rule in service.rules:
            step = _trace_rule(rule, req)
            steps.append(step)
            if step.matched:
                winner = rule
                break
    authz = ALLOW_ALL if service.authorization is None else service.authorization.decide(request.source, method, path)
    why = _authorization_why(service.authorization, authz, request.source, method, path)
    response: ProxyAnswer | None = None
    if winner is None:
        response = ProxyAnswer(404, "no-route")
    elif winner.fault is not None and winner.fault.abort_status is not None and winner.fault.abort_percent >= 100:
        response = ProxyAnswer(winner.fault.abort_status, "fault")
    elif not authz.allowed:
        response = ProxyAnswer(403, "denied")
    return Decision(request, service, tuple(steps), winner, authz, why, response)
