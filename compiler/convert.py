"""Turning one checked builtin call into its spec value, and checking argument conflicts.

`Converter.convert(call)` binds and checks the call's arguments (compiler/args.py),
converts its nested calls the same way, then builds the spec type (bundle/spec.py) or
returns INVALID when anything was reported. Conflicts between arguments of one call
(two path conditions in one match, a fault that does nothing) are SM210, reported
here because only the whole call shows them.

Declarations (mesh, service, http_route, authorization, request_test) convert to their
spec values too; compiler/build.py keys them by name and checks uniqueness.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

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
    StringMatch,
    Tracing,
)
from starmesh.compiler.args import ArgChecker, Bound
from starmesh.compiler.calls import Call
from starmesh.compiler.reporter import INVALID, Reporter

__all__ = ["Converter"]

_T = TypeVar("_T")


class Converter:
    """Checks and converts calls, reporting every problem to one Reporter."""

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self._args = ArgChecker(reporter, self.convert)

    def check(self, call: Call) -> Bound:
        """Bind and check `call`'s arguments (nested calls converted) without building it."""
        return self._args.check_call(call)

    def build(self, bound: Bound) -> Any:
        """The spec value of a checked call, or INVALID when it had a problem."""
        if not bound.complete:
            return INVALID
        return _BUILDERS[bound.builtin.name](bound, self._reporter)

    def convert(self, call: Call) -> Any:
        """Check and build `call`: its spec value, or INVALID when anything was reported."""
        return self.build(self.check(call))


_Builder = Callable[[Bound, Reporter], Any]


def _conflict(bound: Bound, reporter: Reporter, message: str, hint: str) -> Any:
    reporter.at_call(bound.call, "SM210", f"{bound.builtin.name}(): {message}", hint)
    return INVALID


def _unique(items: Iterable[_T]) -> tuple[_T, ...]:
    """Items in first-seen order without repeats."""
    return tuple(dict.fromkeys(items))


def _unique_or_none(items: tuple[_T, ...] | None) -> tuple[_T, ...] | None:
    return None if items is None else _unique(items)


def _mesh(b: Bound, r: Reporter) -> Any:
    v = b.values
    return MeshConfig(
        name=v["name"],
        trust_domain=v["trust_domain"],
        mtls=v["mtls"],
        tracing=v["tracing"] or Tracing(),
        access_log=v["access_log"] or AccessLog(),
        rollout=v["rollout"] or Rollout(),
    )


def _tracing(b: Bound, r: Reporter) -> Any:
    return Tracing(sample_percent=b.values["sample_percent"])


def _access_log(b: Bound, r: Reporter) -> Any:
    v = b.values
    return AccessLog(enabled=v["enabled"], max_lines_per_second=v["max_lines_per_second"])


def _rollout(b: Bound, r: Reporter) -> Any:
    v = b.values
    return Rollout(canary_percent=v["canary_percent"], bake_ms=v["bake"], max_failures=v["max_failures"])


def _service(b: Bound, r: Reporter) -> Any:
    v = b.values
    versions: tuple[str, ...] = v["versions"]
    if not versions:
        r.at_call(
            b.call, "SM207", "service(versions): a service needs at least one version", 'e.g. versions = ["v1"]'
        )
        return INVALID
    repeated = sorted(name for name, count in Counter(versions).items() if count > 1)
    if repeated:
        r.at_call(
            b.call,
            "SM209",
            f"service(versions): {', '.join(repeated)} listed more than once",
            "list each version once",
        )
        return INVALID
    return Service(
        port=v["port"],
        versions=versions,
        timeout_ms=v["timeout"],
        retries=v["retries"],
        circuit_breaker=v["circuit_breaker"],
        outlier_detection=v["outlier_detection"],
        rate_limit=v["rate_limit"],
        load_balancer=v["load_balancer"],
        endpoints=v["endpoints"],
        mtls=v["mtls"],
    )


def _retries(b: Bound, r: Reporter) -> Any:
    v = b.values
    if v["attempts"] > 0 and not v["on"]:
        return _conflict(
            b, r, f"attempts = {v['attempts']} but `on` is empty, so nothing is retried",
            'give conditions, e.g. on = ["5xx", "connect-failure", "reset"], or set attempts = 0',
        )
    return Retries(
        attempts=v["attempts"],
        per_try_timeout_ms=v["per_try_timeout"],
        on=_unique(v["on"]),
        budget_percent=v["budget_percent"],
    )


def _circuit_breaker(b: Bound, r: Reporter) -> Any:
    v = b.values
    return CircuitBreaker(
        max_connections=v["max_connections"],
        max_pending_requests=v["max_pending_requests"],
        max_requests=v["max_requests"],
    )


def _outlier_detection(b: Bound, r: Reporter) -> Any:
    v = b.values
    return OutlierDetection(
        consecutive_5xx=v["consecutive_5xx"],
        interval_ms=v["interval"],
        base_ejection_time_ms=v["base_ejection_time"],
        max_ejection_percent=v["max_ejection_percent"],
    )


def _rate_limit(b: Bound, r: Reporter) -> Any:
    v = b.values
    rate = v["requests_per_second"]
    burst = v["burst"] if v["burst"] is not None else max(1, math.ceil(rate))
    return RateLimit(requests_per_second=rate, burst=burst)


def _http_route(b: Bound, r: Reporter) -> Any:
    rules: tuple[Rule, ...] = b.values["rules"]
    if not rules:
        r.at_call(
            b.call,
            "SM207",
            "http_route(rules): an http_route needs at least one rule",
            "add a rule, e.g. rules = [rule(backends = {\"v1\": 100})], or remove the http_route "
            "(a service without one sends traffic to all its endpoints)",
        )
        return INVALID
    return rules


def _rule(b: Bound, r: Reporter) -> Any:
    v = b.values
    both = sorted(set(v["set_request_headers"]) & set(v["remove_request_headers"]))
    if both:
        return _conflict(
            b, r, f"header {', '.join(both)} is both set and removed",
            "set_request_headers replaces a header already; drop it from remove_request_headers",
        )
    return Rule(
        match=v["match"],
        backends=v["backends"],
        timeout_ms=v["timeout"],
        retries=v["retries"],
        fault=v["fault"],
        mirror=v["mirror"],
        set_request_headers=v["set_request_headers"],
        remove_request_headers=_unique(v["remove_request_headers"]),
    )


_PATH_PARAMS = ("path_exact", "path_prefix", "path_regex")


def _match(b: Bound, r: Reporter) -> Any:
    v = b.values
    given = [p for p in _PATH_PARAMS if v[p] is not None]
    if len(given) > 1:
        return _conflict(
            b, r, f"{' and '.join(given)} given together; a match has at most one path condition",
            "keep one, or write two match(...) entries (any of them matches)",
        )
    return Match(
        path_exact=v["path_exact"],
        path_prefix=v["path_prefix"],
        path_regex=v["path_regex"],
        methods=_unique_or_none(v["methods"]),
        headers=v["headers"],
        query=v["query"],
    )


def _regex(b: Bound, r: Reporter) -> Any:
    return StringMatch(kind="regex", value=b.values["pattern"])


def _present(b: Bound, r: Reporter) -> Any:
    return StringMatch(kind="present")


def _fault(b: Bound, r: Reporter) -> Any:
    v = b.values
    if v["delay"] is None and v["abort_status"] is None:
        return _conflict(
            b, r, "neither delay nor abort_status given, so the fault does nothing",
            'e.g. fault(delay = "2s", delay_percent = 10) or fault(abort_status = 503, abort_percent = 5)',
        )
    if v["delay_percent"] > 0 and v["delay"] is None:
        return _conflict(b, r, "delay_percent given without delay", 'add delay = "..." or remove delay_percent')
    if v["abort_percent"] > 0 and v["abort_status"] is None:
        return _conflict(b, r, "abort_percent given without abort_status", "add abort_status or remove abort_percent")
    return Fault(
        delay_ms=v["delay"],
        delay_percent=v["delay_percent"],
        abort_status=v["abort_status"],
        abort_percent=v["abort_percent"],
    )


def _mirror(b: Bound, r: Reporter) -> Any:
    return Mirror(version=b.values["version"], percent=b.values["percent"])


def _authorization(b: Bound, r: Reporter) -> Any:
    return Authorization(rules=b.values["rules"], mode=b.values["mode"])


def _allow(b: Bound, r: Reporter) -> Any:
    v = b.values
    return Allow(
        sources=_unique_or_none(v["sources"]),
        methods=_unique_or_none(v["methods"]),
        paths=_unique_or_none(v["paths"]),
    )


def _request_test(b: Bound, r: Reporter) -> Any:
    v = b.values
    if not v["name"].strip():
        hint = 'name it for what it checks, e.g. "jason sees v2"'
        r.at_call(b.call, "SM209", "request_test(name): the name is empty", hint)
        return INVALID
    if v["backends"] is not None and v["status"] is not None:
        return _conflict(
            b, r, "backends and status given together",
            "status is the answer the proxy itself gives, so no backend is reached; keep one",
        )
    if v["backends"] is not None and v["allowed"] is False:
        return _conflict(
            b, r, "backends given with allowed = False",
            "a denied request reaches no backend; keep one",
        )
    return RequestTest(
        name=v["name"],
        service=v["service"],
        path=v["path"],
        method=v["method"],
        headers=v["headers"],
        source=v["source"],
        backends=v["backends"],
        allowed=v["allowed"],
        status=v["status"],
    )


_BUILDERS: dict[str, _Builder] = {
    "mesh": _mesh,
    "tracing": _tracing,
    "access_log": _access_log,
    "rollout": _rollout,
    "service": _service,
    "retries": _retries,
    "circuit_breaker": _circuit_breaker,
    "outlier_detection": _outlier_detection,
    "rate_limit": _rate_limit,
    "http_route": _http_route,
    "rule": _rule,
    "match": _match,
    "regex": _regex,
    "present": _present,
    "fault": _fault,
    "mirror": _mirror,
    "authorization": _authorization,
    "allow": _allow,
    "request_test": _request_test,
}
