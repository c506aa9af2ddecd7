"""Authorization: prepared `authorization(...)` rules and the per-request decision.

Semantics (DESIGN.md):
- a service without an `authorization` allows everything;
- a service with one denies what no `allow` admits; the first admitting allow is
  reported;
- within one allow, every given field must hold; an omitted field (None) means any;
- `sources` are service names proven by mTLS; an unauthenticated request (source
  None) matches no `sources` rule;
- `methods` compare case-insensitively;
- `paths` are exact, or prefixes when they end in `*` (`"*"` alone admits any path);
  the query string is never part of the path;
- `mode = "audit"` never denies: the decision is allowed, with `would_deny` set when
  enforcement would have denied it.

Every possible `AuthzDecision` is built once with the table, so deciding allocates
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starmesh.bundle.spec import Allow, Authorization, SourceLocation

__all__ = ["ALLOW_ALL", "AuthzDecision", "PreparedAllow", "PreparedAuthorization", "prepare_authorization"]

AuthzMode = Literal["enforce", "audit"]


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    """Whether a request is allowed, under which mode, by which allow rule.

    `mode` is None for a service without authorization; `rule_index` is the index of
    the admitting allow rule (None when none admitted it); `would_deny` is true in
    audit mode when enforcement would have denied the request.
    """

    allowed: bool
    mode: AuthzMode | None
    rule_index: int | None
    would_deny: bool = False


ALLOW_ALL = AuthzDecision(allowed=True, mode=None, rule_index=None)
"""The decision for a service without an authorization."""


@dataclass(frozen=True, slots=True)
class PreparedAllow:
    """One allow rule, prepared: None fields admit anything."""

    index: int
    sources: frozenset[str] | None
    methods: frozenset[str] | None
    exact_paths: frozenset[str] | None
    path_prefixes: tuple[str, ...]
    location: SourceLocation | None
    decision: AuthzDecision

    def admits(self, source: str | None, method: str, path: str) -> bool:
        """Whether every given field holds (`method` upper-case, `path` without query)."""
        if self.sources is not None and (source is None or source not in self.sources):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.exact_paths is None:
            return True
        if path in self.exact_paths:
            return True
        for prefix in self.path_prefixes:
            if path.startswith(prefix):
                return True
        return False

    def trace(self, source: str | None, method: str, path: str) -> tuple[bool, str]:
        """The same decision as `admits`, with the reason (for explain): what held, e.g.
        `source productpage, method GET, path /reviews/1 (under /reviews/*)`, or every
        field that did not hold, e.g. `needs source productpage (the request comes from
        ratings)`."""
        admitted = self.admits(source, method, path)
        held: list[str] = []
        failed: list[str] = []
        if self.sources is not None:
            if source is not None and source in self.sources:
                held.append(f"source {source}")
            else:
                who = "has no proven source" if source is None else f"comes from {source}"
                failed.append(f"needs source {_either(self.sources)} (the request {who})")
        if self.methods is not None:
            if method in self.methods:
                held.append(f"method {method}")
            else:
                failed.append(f"needs method {_either(self.methods)} (the request is {method})")
        if self.exact_paths is not None:
            pattern = self._path_pattern(path)
            if pattern is None:
                wanted = sorted(self.exact_paths) + [f"{p}*" for p in self.path_prefixes]
                failed.append(f"needs path {_either(wanted)} (the request is for {path})")
            elif pattern == "*":
                held.append("any path")
            elif pattern == path:
                held.append(f"path {path}")
            else:
                held.append(f"path {path} (under {pattern})")
        if not admitted:
            return False, " and ".join(failed)
        return True, ", ".join(held) if held else "every request"

    def _path_pattern(self, path: str) -> str | None:
        """The `paths` entry that admits `path` (as written), None when none does."""
        if self.exact_paths is not None and path in self.exact_paths:
            return path
        for prefix in self.path_prefixes:
            if path.startswith(prefix):
                return f"{prefix}*"
        return None


def _either(values: frozenset[str] | list[str]) -> str:
    """`a`, `a or b`, `a, b or c` (sorted, so the text is deterministic)."""
    ordered = sorted(values)
    return ordered[0] if len(ordered) == 1 else f"{', '.join(ordered[:-1])} or {ordered[-1]}"


@dataclass(frozen=True, slots=True)
class PreparedAuthorization:
    """A service's authorization, prepared."""

    mode: AuthzMode
    rules: tuple[PreparedAllow, ...]
    location: SourceLocation | None
    no_allow: AuthzDecision

    def decide(self, source: str | None, method: str, path: str) -> AuthzDecision:
        """The decision for one request (`method` upper-case, `path` without query)."""
        for rule in self.rules:
            if rule.admits(source, method, path):
                return rule.decision
        return self.no_allow


def _prepare_allow(index: int, allow: Allow, mode: AuthzMode, location: SourceLocation | None) -> PreparedAllow:
    exact: frozenset[str] | None = None
    prefixes: tuple[str, ...] = ()
    if allow.paths is not None:
        exact = frozenset(p for p in allow.paths if not p.endswith("*"))
        prefixes = tuple(p[:-1] for p in allow.paths if p.endswith("*"))
    return PreparedAllow(
        index=index,
        sources=None if allow.sources is None else frozenset(allow.sources),
        methods=None if allow.methods is None else frozenset(m.upper() for m in allow.methods),
        exact_paths=exact,
        path_prefixes=prefixes,
        location=location,
        decision=AuthzDecision(allowed=True, mode=mode, rule_index=index),
    )


def prepare_authorization(
    service: str, authorization: Authorization, source_map: dict[str, SourceLocation]
) -> PreparedAuthorization:
    """Prepare a service's authorization; locations come from `authorization/<service>[/<i>]`."""
    mode = authorization.mode
    rules = tuple(
        _prepare_allow(i, allow, mode, source_map.get(f"authorization/{service}/{i}"))
        for i, allow in enumerate(authorization.rules)
    )
    if mode == "audit":
        no_allow = AuthzDecision(allowed=True, mode=mode, rule_index=None, would_deny=True)
    else:
        no_allow = AuthzDecision(allowed=False, mode=mode, rule_index=None)
    return PreparedAuthorization(mode, rules, source_map.get(f"authorization/{service}"), no_allow)
