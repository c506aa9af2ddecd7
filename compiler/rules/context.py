"""What every lint rule reads: the built Spec, where its objects were declared, and the
effective resilience policy of each call path.

Locations come from `Spec.source_map`. A key that is missing falls back to the nearest
enclosing object (a rule to its http_route, then its service), then to `mesh`, then to
`<policy>:1:1`, so a rule never fails for want of a location.

A *route policy* is how the caller's proxy treats one kind of request to a service: one
per rule of its http_route (the rule's timeout and retries, else the service's), or one
for the service itself when it has no http_route.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

from starmesh.bundle.spec import Retries, Service, SourceLocation, Spec
from starmesh.compiler.codes import CODES
from starmesh.compiler.diagnostics import Finding

__all__ = [
    "POLICY_FALLBACK",
    "CallEdge",
    "LintContext",
    "RoutePolicy",
    "authorization_key",
    "quoted",
    "route_key",
    "service_key",
]

_T = TypeVar("_T")

POLICY_FALLBACK = SourceLocation(file="<policy>", line=1, col=1)
"""Where a finding goes when the spec has no location at all (not even `mesh`)."""


def quoted(name: str) -> str:
    """A policy name as messages show it: in double quotes, as it is written in Starlark."""
    return f'"{name}"'


def service_key(service: str) -> str:
    return f"service/{service}"


def route_key(service: str, index: int) -> str:
    return f"route/{service}/{index}"


def authorization_key(service: str, index: int | None = None) -> str:
    return f"authorization/{service}" if index is None else f"authorization/{service}/{index}"


def _enclosing(key: str) -> tuple[str, ...]:
    """`key` and then the keys of the objects around it, nearest first (mesh not included)."""
    kind, _, rest = key.partition("/")
    if kind == "route":
        service, _, _ = rest.rpartition("/")
        return (key, f"http_route/{service}", service_key(service))
    if kind == "http_route":
        return (key, route_key(rest, 0), service_key(rest))
    if kind == "authorization":
        service, slash, _ = rest.rpartition("/")
        if slash:
            return (key, authorization_key(service), service_key(service))
        return (key, service_key(rest))
    return (key,)


@dataclass(frozen=True)
class RoutePolicy:
    """The effective timeout and retries of one call path to a service.

    `rule` is the index of the http_route rule, or None for a service without an
    http_route. The `*_key`s say which object each setting was declared on.
    """

    service: str
    rule: int | None
    timeout_ms: int | None
    timeout_key: str | None
    retries: Retries | None
    retries_key: str | None

    @property
    def key(self) -> str:
        """Where to report this path: its rule, or the service when there is none."""
        return service_key(self.service) if self.rule is None else route_key(self.service, self.rule)

    @property
    def label(self) -> str:
        """How messages name this path: `"reviews"` or `"reviews" rules[1]`."""
        return quoted(self.service) if self.rule is None else f"{quoted(self.service)} rules[{self.rule}]"

    def label_of(self, key: str) -> str:
        """How messages name the object at `key`: this rule, or the whole service."""
        return self.label if key == self.key else quoted(self.service)

    @property
    def retried(self) -> bool:
        return self.retries is not None and self.retries.attempts > 0

    @property
    def tries(self) -> int:
        """How many times one request may be sent: the first try plus the retries."""
        return 1 + (self.retries.attempts if self.retries is not None else 0)

    @property
    def worst_case_ms(self) -> int | None:
        """The longest a request on this path can take, or None when nothing bounds it.

        The overall timeout bounds everything; without it, (attempts + 1) x per_try_timeout
        does when every try is bounded (the backoff between tries is not counted)."""
        bounds: list[int] = []
        if self.timeout_ms is not None:
            bounds.append(self.timeout_ms)
        if self.retries is not None and self.retries.per_try_timeout_ms is not None:
            bounds.append(self.tries * self.retries.per_try_timeout_ms)
        return min(bounds) if bounds else None

    def report_key(self) -> str:
        """The most specific object that declared one of this path's settings."""
        if self.rule is not None and route_key(self.service, self.rule) in (self.timeout_key, self.retries_key):
            return self.key
        return service_key(self.service)


@dataclass(frozen=True)
class CallEdge:
    """`caller` may call `callee`: an allow on `callee` names `caller` in its sources."""

    caller: str
    callee: str
    allow_key: str


@dataclass(frozen=True)
class LintContext:
    """The spec under lint and what the rules derive from it (computed once)."""

    spec: Spec

    def where(self, key: str) -> SourceLocation:
        """The location of `key`, else of the nearest enclosing object, else the mesh."""
        source_map = self.spec.source_map
        for candidate in (*_enclosing(key), "mesh"):
            found = source_map.get(candidate)
            if found is not None:
                return found
        return POLICY_FALLBACK

    def finding(self, code: str, key: str, message: str, hint: str | None = None) -> Finding:
        """A finding for rule `code` (its severity from the code table) at `key`."""
        return Finding.at(self.where(key), code, CODES[code].severity, message, hint)

    def mtls_of(self, service: Service) -> str:
        """The service's effective mTLS mode: its own, else the mesh's."""
        return service.mtls if service.mtls is not None else self.spec.mesh.mtls

    def policies(self, service: str) -> tuple[RoutePolicy, ...]:
        """The route policies of a declared service (empty for an undeclared one)."""
        return self._policies.get(service, ())

    @cached_property
    def _policies(self) -> dict[str, tuple[RoutePolicy, ...]]:
        result: dict[str, tuple[RoutePolicy, ...]] = {}
        for name, service in self.spec.services.items():
            skey = service_key(name)
            rules = self.spec.routes.get(name)
            if rules is None:
                result[name] = (
                    RoutePolicy(
                        name,
                        None,
                        service.timeout_ms,
                        skey if service.timeout_ms is not None else None,
                        service.retries,
                        skey if service.retries is not None else None,
                    ),
                )
                continue
            paths: list[RoutePolicy] = []
            for index, rule in enumerate(rules):
                rkey = route_key(name, index)
                timeout, timeout_key = _pick(rule.timeout_ms, rkey, service.timeout_ms, skey)
                retries, retries_key = _pick(rule.retries, rkey, service.retries, skey)
                paths.append(RoutePolicy(name, index, timeout, timeout_key, retries, retries_key))
            result[name] = tuple(paths)
        return result

    @cached_property
    def call_edges(self) -> tuple[CallEdge, ...]:
        """Caller -> callee edges between declared services, from authorization sources.

        Self-calls are left out; each edge appears once (at its first allow), sorted."""
        edges: dict[tuple[str, str], CallEdge] = {}
        services = self.spec.services
        for callee in sorted(self.spec.authorization):
            if callee not in services:
                continue
            for index, allow in enumerate(self.spec.authorization[callee].rules):
                for caller in allow.sources or ():
                    if caller in services and caller != callee and (caller, callee) not in edges:
                        edges[(caller, callee)] = CallEdge(caller, callee, authorization_key(callee, index))
        return tuple(edges[pair] for pair in sorted(edges))


def _pick(own: _T | None, own_key: str, inherited: _T | None, inherited_key: str) -> tuple[_T | None, str | None]:
    if own is not None:
        return own, own_key
    if inherited is not None:
        return inherited, inherited_key
    return None, None
