"""Resilience settings that do not do what they seem to.

SM402: retries on a call path with neither a per_try_timeout nor an overall timeout
(the rule's, else the service's): a hung try is never cut off, so it is never retried
and the request waits forever.
SM408: a per_try_timeout not shorter than the path's overall timeout: the first try
uses up the whole request's time, so no retry can ever happen.

A problem is reported where the setting that causes it is declared: on the rule when
the rule sets the retries or the timeout, else on the service (once).
"""

from __future__ import annotations

from collections.abc import Iterator

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.durations import format_duration
from starmesh.compiler.rules.context import LintContext

__all__ = ["per_try_not_shorter", "retries_unbounded"]


def retries_unbounded(ctx: LintContext) -> Iterator[Finding]:
    """SM402: retries with no per-try timeout and no overall timeout."""
    seen: set[str] = set()
    for name in sorted(ctx.spec.services):
        for path in ctx.policies(name):
            retries = path.retries
            if retries is None or retries.attempts == 0:
                continue
            if retries.per_try_timeout_ms is not None or path.timeout_ms is not None:
                continue
            key = path.report_key()
            if key in seen:
                continue  # service-level retries inherited by several rules: report once
            seen.add(key)
            yield ctx.finding(
                "SM402",
                key,
                f"retries on {path.label_of(key)} have no per_try_timeout and the path has no timeout: "
                "a hung try is never cut off, so it is never retried and the request can wait forever",
                'add per_try_timeout = "250ms" to retries(...), or a timeout to the rule or service',
            )


def per_try_not_shorter(ctx: LintContext) -> Iterator[Finding]:
    """SM408: per_try_timeout >= the effective timeout."""
    seen: set[str] = set()
    for name in sorted(ctx.spec.services):
        for path in ctx.policies(name):
            retries, timeout = path.retries, path.timeout_ms
            if retries is None or retries.per_try_timeout_ms is None or timeout is None:
                continue
            if retries.attempts == 0 or retries.per_try_timeout_ms < timeout:
                continue
            key = path.report_key()
            if key in seen:
                continue
            seen.add(key)
            per_try = format_duration(retries.per_try_timeout_ms)
            yield ctx.finding(
                "SM408",
                key,
                f"per_try_timeout {per_try} on {path.label_of(key)} is not shorter than its timeout "
                f"{format_duration(timeout)}: the first try uses up the request's time and no retry can happen",
                f"make per_try_timeout at most timeout / (attempts + 1), e.g. "
                f"{format_duration(max(1, timeout // (retries.attempts + 1)))}",
            )
