"""Every lint/compile rule code, its severity and what it checks.

Codes are stable: tools and CI annotations key on them. Ranges:
  SM1xx  evaluating the Starlark (syntax, unknown names, load(), resource bounds)
  SM2xx  one builtin call's arguments (unknown or missing argument, types, values)
  SM3xx  references and uniqueness across the policy (services, versions, duplicates)
  SM4xx  warnings: legal but risky configurations
  SM5xx  golden requests

Each code has a failing and a passing example under docs/rules/<CODE>/ (bad and good
policy trees); a test checks that the bad one reports the code and the good one does
not, and docs/policy-reference.md is generated from this table and those examples.
"""

from __future__ import annotations

from dataclasses import dataclass

from starmesh.compiler.diagnostics import Severity

__all__ = ["CODES", "Code"]


@dataclass(frozen=True)
class Code:
    """A rule: its stable code, severity and a one-line description."""

    code: str
    severity: Severity
    title: str


_ALL = (
    # Evaluation.
    Code("SM101", "error", "Starlark syntax error"),
    Code("SM102", "error", "unknown name: a builtin or variable that does not exist"),
    Code("SM103", "error", "Starlark evaluation error (a failed operation, fail(), a type error in expressions)"),
    Code("SM104", "error", "load() error: bad label, file outside the policy root, missing file or symbol"),
    Code("SM105", "error", "load() cycle"),
    Code("SM106", "error", "resource bound exceeded: time, memory, call depth or output size"),
    # One call's arguments.
    Code("SM201", "error", "unknown argument to a builtin"),
    Code("SM202", "error", "missing required argument, or too many positional arguments"),
    Code("SM203", "error", "argument of the wrong type"),
    Code("SM204", "error", "invalid duration, or a duration out of range (1ms to 24h)"),
    Code("SM205", "error", "invalid regular expression"),
    Code("SM206", "error", "backend weights do not sum to 100, or a weight is out of range"),
    Code("SM207", "error", "value out of range (percent, port, status, count, rate)"),
    Code("SM208", "error", "value not one of the allowed choices"),
    Code("SM209", "error", "invalid name, path, method, header or endpoint address"),
    Code("SM210", "error", "conflicting arguments (e.g. two path conditions in one match)"),
    # References and uniqueness.
    Code("SM301", "error", "mesh() missing or declared more than once"),
    Code("SM302", "error", "duplicate service"),
    Code("SM303", "error", "unknown service"),
    Code("SM304", "error", "unknown version of a service"),
    Code("SM305", "error", "more than one http_route or authorization for a service"),
    Code("SM306", "error", "duplicate request_test name"),
    # Warnings.
    Code("SM401", "warning", "rule shadowed by an earlier catch-all rule"),
    Code("SM402", "warning", "retries without a per-try timeout or a timeout"),
    Code("SM403", "warning", "authorization sources cannot be verified without mTLS"),
    Code("SM404", "warning", "mirror to the version that already gets the traffic"),
    Code("SM405", "warning", "timeout inversion: a caller's timeout is shorter than its callee's tries"),
    Code("SM406", "warning", "retry amplification: retries on two consecutive hops"),
    Code("SM407", "warning", "authorization in audit mode denies nothing"),
    Code("SM408", "warning", "per-try timeout not shorter than the overall timeout"),
    Code("SM409", "warning", "declared version that no rule routes to while routes exist"),
    Code("SM410", "warning", "fault injection aborts or delays every request"),
    Code("SM411", "warning", "rule shadowed by earlier rules that match every request it matches"),
    Code("SM412", "warning", "authorization that admits nothing (an empty allow list, or no allow at all)"),
    Code("SM413", "warning", "mirror or fault that does nothing (percent 0)"),
    Code("SM414", "warning", "relaxed mTLS: plaintext accepted, callers without proven identity"),
    Code("SM415", "warning", "wide-open access: an enforcing allow that admits every caller for every request"),
    # Golden requests.
    Code("SM501", "error", "golden request failed"),
)

CODES: dict[str, Code] = {c.code: c for c in _ALL}
