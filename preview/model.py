"""What `starmesh diff` reports: changes with their risk, and the impact on sample requests.

A `DiffReport` is the product of comparing two compiled bundles (`report.compare`); the
command line renders it as rich text, Markdown or JSON (DESIGN.md, "Diff JSON"):

    {"behaviour_changed": bool,
     "base": {"label", "commit", "digest"}, "head": {...},
     "changes": [{"service", "kind", "summary", "old", "new", "risk": [...], "file", "line"}],
     "requests": [{"name", "origin", "request", "before", "after", "changed": [...]}],
     "request_tests": {"added": [...], "removed": [...], "changed": [...]}}

`service` is null for mesh-level changes. `risk` holds labels from the fixed
vocabulary below, so tools can match on them. `file`/`line` point at the policy object
that caused the change: in the head's policy, or in the base's for something removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ADDS_FAULTS",
    "CHANGES_PRECEDENCE",
    "MIRRORS_TRAFFIC",
    "NARROWS_ACCESS",
    "RELAXES_MTLS",
    "REMOVES_PROTECTION",
    "REMOVES_ROUTE",
    "RISK_ORDER",
    "UNREACHABLE_RULE",
    "WIDENS_ACCESS",
    "Change",
    "DiffReport",
    "ImpactFlag",
    "Outcome",
    "RequestImpact",
    "Side",
    "TestChanges",
    "shifts_traffic",
]

# -- risk labels -------------------------------------------------------------------------
WIDENS_ACCESS = "widens access"
"""A caller gains access it did not have: an allow added or widened, authorization
removed or switched to audit, mTLS relaxed (unauthenticated callers get in)."""
NARROWS_ACCESS = "narrows access"
"""A caller loses access it had: its requests start failing with 403."""
REMOVES_PROTECTION = "removes protection"
"""A resilience or security guard is removed or loosened: timeout, retries' per-try
timeout, circuit breaker, outlier detection, rate limit removed or raised."""
RELAXES_MTLS = "relaxes mTLS"
"""strict -> permissive or disable, permissive -> disable (mesh or service)."""
ADDS_FAULTS = "adds faults"
"""Fault injection added or increased (delay or abort)."""
MIRRORS_TRAFFIC = "mirrors traffic"
"""A mirror added or its share raised: extra load on the mirror target."""
UNREACHABLE_RULE = "makes a rule unreachable"
"""A rule that could match before is shadowed by an earlier one now."""
CHANGES_PRECEDENCE = "changes rule precedence"
"""Rules reordered: which rule wins a request may change."""
REMOVES_ROUTE = "removes a route"
"""A rule removed (its requests fall through to later rules, or 404), or a service removed."""


def shifts_traffic(percent: int | float) -> str:
    """The label for a weight change moving `percent` of a rule's traffic between versions."""
    return f"shifts {percent:g}% of traffic"


RISK_ORDER = (
    WIDENS_ACCESS,
    RELAXES_MTLS,
    REMOVES_PROTECTION,
    NARROWS_ACCESS,
    ADDS_FAULTS,
    REMOVES_ROUTE,
    UNREACHABLE_RULE,
    CHANGES_PRECEDENCE,
    MIRRORS_TRAFFIC,
)
"""How renderers sort labels (most serious first); `shifts N% of traffic` goes after
REMOVES_ROUTE."""


# -- changes -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Change:
    """One behavioural difference between the base's policy and the head's.

    `kind` is a dotted name from docs/preview.md's table (`traffic.shift`,
    `route.added`, `access.gained`, `mesh.mtls`, ...). `old` and `new` are JSON values
    (None when the thing did not exist on that side). `summary` is one line for people,
    e.g. `reviews: v1 90% → 50%, v3 10% → 50%`."""

    service: str | None
    kind: str
    summary: str
    old: Any = None
    new: Any = None
    risk: tuple[str, ...] = ()
    file: str | None = None
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "kind": self.kind,
            "summary": self.summary,
            "old": self.old,
            "new": self.new,
            "risk": list(self.risk),
            "file": self.file,
            "line": self.line,
        }


@dataclass(frozen=True, slots=True)
class TestChanges:
    """Golden requests (`request_test`) added, removed or changed, by name. They are
    checks, not behaviour: they never make `behaviour_changed` true."""

    __test__ = False  # not a pytest test class, despite its name

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "removed": list(self.removed), "changed": list(self.changed)}


# -- impact on requests ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one request goes on one side, from that side's `Decision`.

    `backends` is the decided shares (None when no rule matched); `rule` the winning
    rule's {"index", "file", "line"} or None; `allowed` the authorization decision;
    `response` the proxy's own answer {"status", "reason"} or None; `error` is set
    instead of all of them when the side does not declare the service."""

    backends: Mapping[str, int] | None = None
    rule: Mapping[str, Any] | None = None
    allowed: bool | None = None
    response: Mapping[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {
            "backends": None if self.backends is None else dict(self.backends),
            "rule": None if self.rule is None else dict(self.rule),
            "allowed": self.allowed,
            "response": None if self.response is None else dict(self.response),
        }


ImpactFlag = Literal["destination", "authorization", "response"]


@dataclass(frozen=True, slots=True)
class RequestImpact:
    """One sample request decided against both sides.

    `origin` is "golden" for the policies' request_tests (either side's) and "file" for
    `--requests FILE`. `request` is the explain JSON's request object plus the service:
    {"service", "method", "path", "headers", "source"}. `changed` lists what differs:
    "destination" (backends or 404), "authorization" (allowed), "response" (the
    proxy's own answer); empty when the request is treated alike."""

    name: str
    origin: Literal["golden", "file"]
    request: Mapping[str, Any]
    before: Outcome
    after: Outcome
    changed: tuple[ImpactFlag, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "origin": self.origin,
            "request": dict(self.request),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "changed": list(self.changed),
        }


# -- the report ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Side:
    """One side of a comparison: how the user named it, its commit and bundle digest.

    `label` is e.g. "HEAD (3f2a9c1e4b7d)", "working tree", "control plane
    http://127.0.0.1:8080 (release 7)"; `commit` is null for a working tree."""

    label: str
    commit: str | None
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "commit": self.commit, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class DiffReport:
    """Everything `starmesh diff` shows."""

    base: Side
    head: Side
    changes: tuple[Change, ...]
    requests: tuple[RequestImpact, ...] = ()
    request_tests: TestChanges = field(default_factory=TestChanges)

    @property
    def behaviour_changed(self) -> bool:
        """True when the proxies would behave differently (what `--exit-code` reports)."""
        return bool(self.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "behaviour_changed": self.behaviour_changed,
            "base": self.base.to_json(),
            "head": self.head.to_json(),
            "changes": [c.to_json() for c in self.changes],
            "requests": [r.to_json() for r in self.requests],
            "request_tests": self.request_tests.to_json(),
        }
