"""The decision engine: where does a request go, and is it allowed.

There is one implementation, and everything calls it (DESIGN.md): golden requests in
`starmesh lint`/`compile`, the proxy's hot path, `starmesh explain` and the proxy's
`/explain`. A `DecisionTable` is built once from a validated `Spec` and never changes:

    table = DecisionTable.build(spec)              # BundleError if it cannot be built
    table.route(service, method, path, headers)    # the proxy's fast path, per request
    table.authorize(service, source, method, path) # the receiving side, per request
    table.explain(RequestInfo(service=..., ...))   # the same decision, with the trace
    run_request_tests(table)                       # golden requests -> failures

Routing semantics: a service's rules are tried in order and the first rule whose
`match` holds wins (a rule without `match` matches everything; the matches of a rule
are OR, the fields of one match AND). A service with no `http_route` sends every
request to all its endpoints. When a service has routes but no rule matches, the
proxy answers 404 `no-route` itself, as Envoy and Istio do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from starmesh.bundle.authz import ALLOW_ALL, AuthzDecision
from starmesh.bundle.errors import BundleError
from starmesh.bundle.explain import Decision, RequestInfo, explain_request
from starmesh.bundle.gcpause import paused_gc
from starmesh.bundle.golden import RequestTestFailure, run_request_tests
from starmesh.bundle.match import RequestView, Test, any_match
from starmesh.bundle.routes import PreparedRule, PreparedService, prepare_service
from starmesh.bundle.spec import Spec

__all__ = [
    "AuthzDecision",
    "Decision",
    "DecisionTable",
    "PreparedRule",
    "PreparedService",
    "RequestInfo",
    "RequestTestFailure",
    "RouteDecision",
    "UnknownService",
    "run_request_tests",
]


class UnknownService(BundleError, LookupError):
    """The request names a service the bundle does not declare."""

    def __init__(self, service: str) -> None:
        super().__init__(f"unknown service {service!r}: the bundle does not declare it")
        self.service = service

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where the fast path sends a request: the service and the winning rule.

    `rule` is None when the service has routes but none matched (404 `no-route`).
    Every RouteDecision is built with the table; routing allocates none."""

    service: PreparedService
    rule: PreparedRule | None


@dataclass(frozen=True, slots=True)
class _Routing:
    """A service's rules in order as `route` reads them: (the rule's matches compiled
    into one test (`any_match`), or None when it applies to everything, and its
    decision): one call per rule, the same answer as `PreparedRule.applies`."""

    service: PreparedService
    candidates: tuple[tuple[Test | None, RouteDecision], ...]
    no_route: RouteDecision


class DecisionTable:
    """The prepared, immutable decision table of one bundle. Build it with `build`."""

    __slots__ = ("_spec", "_routing", "_services")

    def __init__(self, spec: Spec, services: Mapping[str, PreparedService]) -> None:
        self._spec = spec
        self._services = MappingProxyType(dict(services))
        self._routing = {
            name: _Routing(
                service=svc,
                candidates=tuple(
                    (any_match(rule.matches) if rule.matches else None, RouteDecision(svc, rule)) for rule in svc.rules
                ),
                no_route=RouteDecision(svc, None),
            )
            for name, svc in services.items()
        }

    @classmethod
    def build(cls, spec: Spec) -> DecisionTable:
        """Prepare every service of a validated spec.

        Raises BundleError when the spec cannot be turned into a table: a route or
        authorization for an undeclared service, a backend or mirror naming an
        undeclared version, weights not summing to 100, an invalid regex."""
        with paused_gc():
            return cls._build(spec)

    @classmethod
    def _build(cls, spec: Spec) -> DecisionTable:
        for name in spec.routes:
            if name not in spec.services:
                raise BundleError(f"route/{name}: http_route for undeclared service {name!r}")
        for name in spec.authorization:
            if name not in spec.services:
                raise BundleError(f"authorization/{name}: authorization for undeclared service {name!r}")
        services = {
            name: prepare_service(name, svc, spec.routes.get(name), spec.authorization.get(name), spec)
            for name, svc in spec.services.items()
        }
        return cls(spec, services)

    @property
    def spec(self) -> Spec:
        """The spec the table was built from."""
        return self._spec

    @property
    def services(self) -> Mapping[str, PreparedService]:
        """Every prepared service by name (read-only)."""
        return self._services

    def service(self, name: str) -> PreparedService:
        """A prepared service; raises UnknownService."""
        try:
            return self._services[name]
        except KeyError:
            raise UnknownService(name) from None

    def route(
        self, service: str, method: str, path: str, headers: Mapping[str, str], query: str | None = None
    ) -> RouteDecision | None:
        """The fast path: the decision for one request, or None for an unknown service.

        `headers` must map lower-case names to values (repeated headers joined with
        ","); `path` is split at "?" when `query` is not given separately. A decision
        with `rule` None means no rule matched: answer 404 `no-route`."""
        routing = self._routing.get(service)
        if routing is None:
            return None
        if query is None and "?" in path:
            path, _, query = path.partition("?")
        req = RequestView(method.upper(), path, headers, query)
        for applies, decision in routing.candidates:
            if applies is None or applies(req):  # PreparedRule.applies; None: no match, applies to all
                return decision
        return routing.no_route

    def authorize(self, service: str, source: str | None, method: str, path: str) -> AuthzDecision:
        """Whether `source` (a proven service identity, None when unauthenticated) may
        call `method path` on `service`. Raises UnknownService."""
        routing = self._routing.get(service)
        if routing is None:
            raise UnknownService(service)
        authz = routing.service.authorization
        if authz is None:
            return ALLOW_ALL
        if "?" in path:
            path = path.partition("?")[0]
        return authz.decide(source, method.upper(), path)

    def explain(self, request: RequestInfo) -> Decision:
        """The full decision with its trace (same matching code as `route`).

        Raises UnknownService when the bundle does not declare `request.service`."""
        return explain_request(self.service(request.service), request)
