"""Checks along the call graph that authorization rules reveal.

An `allow(sources = ["A"])` in the authorization of B is an edge A -> B: A calls B.
Each edge is checked on its own (self-calls are left out), so cycles in the graph need
no special care.

SM405 timeout inversion. A request into A waits for A's calls to B. If a timeout that
A's callers apply to A (the service's or a rule's timeout, or the per_try_timeout of
A's retries) is shorter than the longest a call to B may take, A's callers give up (or
start another try) while B is still being tried. The longest a call to
B may take is, per call path of B, the smaller of its timeout and (attempts + 1) x
per_try_timeout; call paths that nothing bounds are not compared. The warning is at A's
timeout and names B and both durations.

SM406 retry amplification. When requests to A are retried and A's calls to B are
retried too, one request can reach B (a + 1) x (b + 1) times. The warning is at the
retries of A with the most attempts and gives the factor (from the largest attempts on
both sides).
"""

from __future__ import annotations

from collections.abc import Iterator

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.durations import format_duration
from starmesh.compiler.rules.context import LintContext, RoutePolicy, quoted

__all__ = ["retry_amplification", "timeout_inversion"]


def _slowest(paths: tuple[RoutePolicy, ...]) -> RoutePolicy | None:
    """The bounded call path that may take longest (the first one on a tie)."""
    best: RoutePolicy | None = None
    for path in paths:
        worst = path.worst_case_ms
        if worst is None:
            continue
        if best is None or worst > (best.worst_case_ms or 0):
            best = path
    return best


def _explain(path: RoutePolicy) -> str:
    worst = path.worst_case_ms
    assert worst is not None
    retries = path.retries
    per_try = retries.per_try_timeout_ms if retries is not None else None
    if per_try is not None and worst == path.tries * per_try:
        return f"{format_duration(worst)} ({path.tries} tries x {format_duration(per_try)} per try)"
    return f"{format_duration(worst)} (its timeout)"


def timeout_inversion(ctx: LintContext) -> Iterator[Finding]:
    """SM405: a caller's timeout (or per-try timeout) shorter than the longest its callee may take."""
    seen: set[tuple[str, str]] = set()
    for edge in ctx.call_edges:
        slowest = _slowest(ctx.policies(edge.callee))
        if slowest is None:
            continue
        needed = slowest.worst_case_ms
        assert needed is not None
        for caller in ctx.policies(edge.caller):
            for limit, key, subject, verb in _caller_limits(caller):
                if limit >= needed or (key, edge.callee) in seen:
                    continue  # a service-level setting shared by several rules: report it once
                seen.add((key, edge.callee))
                yield ctx.finding(
                    "SM405",
                    key,
                    f"timeout inversion: {subject} {caller.label_of(key)} {verb} {format_duration(limit)}, "
                    f"but its calls to {slowest.label} may take up to {_explain(slowest)}",
                    f"raise that timeout of {quoted(edge.caller)} to at least {format_duration(needed)}, or lower "
                    f"the attempts, per_try_timeout or timeout of {quoted(edge.callee)}",
                )


def _caller_limits(caller: RoutePolicy) -> Iterator[tuple[int, str, str, str]]:
    """(duration, where declared, subject, verb) of the caller's timeout and per-try timeout."""
    if caller.timeout_ms is not None and caller.timeout_key is not None:
        yield caller.timeout_ms, caller.timeout_key, "requests to", "time out after"
    retries = caller.retries
    if caller.retried and retries is not None and retries.per_try_timeout_ms is not None and caller.retries_key:
        yield retries.per_try_timeout_ms, caller.retries_key, "each try of requests to", "is cut off after"


def _most_retried(paths: tuple[RoutePolicy, ...]) -> RoutePolicy | None:
    best: RoutePolicy | None = None
    for path in paths:
        if path.retried and (best is None or path.tries > best.tries):
            best = path
    return best


def retry_amplification(ctx: LintContext) -> Iterator[Finding]:
    """SM406: retries configured on two consecutive hops."""
    for edge in ctx.call_edges:
        outer = _most_retried(ctx.policies(edge.caller))
        inner = _most_retried(ctx.policies(edge.callee))
        if outer is None or inner is None or outer.retries_key is None:
            continue
        factor = outer.tries * inner.tries
        yield ctx.finding(
            "SM406",
            outer.retries_key,
            f"retry amplification: requests to {outer.label_of(outer.retries_key)} are tried up to "
            f"{outer.tries} times and its "
            f"calls to {quoted(edge.callee)} up to {inner.tries} times, so one request can reach "
            f"{quoted(edge.callee)} {factor} times ({outer.tries} x {inner.tries})",
            f"retry at one hop only: remove the retries of {quoted(edge.caller)} or of {quoted(edge.callee)}",
        )
