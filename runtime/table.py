"""RouteTable: one applied bundle, ready to carry traffic.

Built once, off to the side, from a decoded bundle (DESIGN.md: "build RouteTable off to
the side, swap one reference"): the bundle's `DecisionTable` (regexes compiled, pickers
prepared) plus a prebuilt handler chain for every (service, rule) on the calling side
and one for the local service on the receiving side. A request takes the table
reference once and uses only it, so an apply never shows it half of two configs.

    table = RouteTable.build(bundle, digest, deps, app="127.0.0.1:9080")
    response = await table.outbound(request)   # route match, then the rule's chain
    response = await table.inbound(request)    # authorization, rate limit, the local app

A request no rule takes is answered 404 `no-route` through telemetry of its own
(`build_answering`: counted, logged, traced like a routed one) under the service it
asked for when the bundle declares it, else "unknown"; that handler is made at the
first such request for each destination, so routing pays nothing for it.

State that outlives a table (connection pools, breakers, outlier ejections, rate
buckets, the endpoint table) lives in `deps`, outside it.

`inbound_policy` is what the inbound listener enforces while the table is live (the
local service's effective mtls mode and the mesh's trust domain): a mesh listener reads
it for each new connection (runtime/tls.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from types import MappingProxyType

from starmesh.bundle.canonical import Bundle
from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.errors import BundleError
from starmesh.bundle.gcpause import paused_gc
from starmesh.runtime.chain import ChainDeps, build_answering, build_inbound, build_outbound
from starmesh.runtime.errors import ConfigRejected
from starmesh.runtime.message import Handler, Headers, Request, Response, proxy_response
from starmesh.runtime.tls import InboundPolicy

__all__ = ["UNKNOWN_SERVICE", "RouteTable", "routing_headers"]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def routing_headers(headers: Headers, names: frozenset[str] | None = None) -> dict[str, str]:
    """Headers as matching reads them: lower-case names (already so), repeats joined with ",".

    With `names`, only those headers (the ones a service's rules read) are kept."""
    out: dict[str, str] = {}
    for name, value in headers:
        if names is not None and name not in names:
            continue
        if name in out:
            out[name] = f"{out[name]},{value}"
        else:
            out[name] = value
    return out


UNKNOWN_SERVICE = "unknown"
"""`destination_service` of a request for a service the bundle does not declare."""


def _no_route(services: Mapping[str, object]) -> Callable[[Request], Response]:
    """The 404 `no-route` answer: the service is not declared, or none of its rules matches."""

    def answer(request: Request) -> Response:
        service = request.service
        if service not in services:
            return proxy_response(404, "no-route", f"unknown service {service!r} (the bundle does not declare it)")
        why = f"no rule of {service}'s http_route matches {request.method} {request.path}"
        return proxy_response(404, "no-route", why)

    return answer


class _Unrouted:
    """Requests no rule takes: one answering handler per destination, made at its first request."""

    __slots__ = ("_deps", "_answer", "_handlers")

    def __init__(self, deps: ChainDeps, services: Mapping[str, object]) -> None:
        self._deps = deps
        self._answer = _no_route(services)
        self._handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {}

    def __call__(self, destination: str, request: Request) -> Awaitable[Response]:
        handler = self._handlers.get(destination)
        if handler is None:
            handler = self._handlers[destination] = build_answering(self._deps, "outbound", destination, self._answer)
        return handler(request)


class RouteTable:
    """An applied bundle's decision table and prebuilt handler chains. Build with `build`."""

    __slots__ = (
        "bundle", "digest", "decisions", "inbound_policy", "_route", "_handlers", "_inbound", "_reads_headers",
        "_unrouted",
    )  # fmt: skip

    def __init__(
        self,
        bundle: Bundle,
        digest: str,
        decisions: DecisionTable,
        handlers: dict[int, Handler],
        inbound: Handler,
        inbound_policy: InboundPolicy,
        deps: ChainDeps,
    ) -> None:
        self.bundle = bundle
        self.digest = digest
        self.decisions = decisions
        self.inbound_policy = inbound_policy
        self._route = decisions.route
        self._handlers = handlers
        self._inbound = inbound
        self._unrouted = _Unrouted(deps, decisions.services)
        # service -> the header names its rules read (only services whose rules read any).
        self._reads_headers: dict[str, frozenset[str]] = {}
        for name, rules in bundle.spec.routes.items():
            read = frozenset(header.lower() for rule in rules for match in rule.match for header in match.headers)
            if read:
                self._reads_headers[name] = read

    @classmethod
    def build(
        cls, bundle: Bundle, digest: str, deps: ChainDeps, *, app: str, decisions: DecisionTable | None = None
    ) -> RouteTable:
        """Prepare every route's handler chain; raise ConfigRejected saying what is wrong.

        `decisions` may be given when the caller has already built the DecisionTable
        (the runtime's own validation step); `app` is the local app's `host:port`."""
        mesh = bundle.spec.mesh
        # Every chain follows its own bundle's mesh settings (tracing, access_log), and
        # with mTLS its trust domain (the SVIDs peers must present).
        deps = replace(deps, mesh=mesh, trust_domain=mesh.trust_domain)
        try:
            with paused_gc():
                table = decisions if decisions is not None else DecisionTable.build(bundle.spec)
                handlers: dict[int, Handler] = {}
                for service in table.services.values():
                    for rule in service.rules:
                        where = f"service/{service.name}" if rule.index is None else f"route/{service.name}/{rule.index}"
                        try:
                            # Keyed by identity: the rules live as long as `table`, and a
                            # dict lookup by id is the cheapest per-request step.
                            handlers[id(rule)] = build_outbound(service, rule, deps)
                        except (BundleError, ValueError, TypeError, KeyError) as exc:
                            raise ConfigRejected(f"route table: {where}: {exc}", reason="validation") from exc
                local = table.services.get(deps.local_service) if deps.local_service else None
                try:
                    inbound = build_inbound(local, deps, app)
                except (BundleError, ValueError, TypeError, KeyError) as exc:
                    raise ConfigRejected(
                        f"route table: inbound chain for {deps.local_service!r}: {exc}", reason="validation"
                    ) from exc
        except BundleError as exc:
            raise ConfigRejected(f"route table: {exc}", reason="validation") from exc
        # The local service's effective mode (service(mtls=) else mesh(mtls=)).
        policy = InboundPolicy(local.mtls if local is not None else mesh.mtls, mesh.trust_domain)
        return cls(bundle, digest, table, handlers, inbound, policy, deps)

    def outbound(self, request: Request) -> Awaitable[Response]:
        """Route a calling-side request: 404 `no-route` or the winning rule's chain.

        Returns the chain's awaitable directly: routing adds no coroutine layer."""
        service = request.service
        read = self._reads_headers.get(service)
        headers = _NO_HEADERS if read is None else routing_headers(request.headers, read)
        decision = self._route(service, request.method, request.path, headers, request.query)
        if decision is None:  # a service the bundle does not declare
            return self._unrouted(UNKNOWN_SERVICE, request)
        rule = decision.rule
        if rule is None:  # none of its rules matches
            return self._unrouted(service, request)
        return self._handlers[id(rule)](request)

    def inbound(self, request: Request) -> Awaitable[Response]:
        """Handle a receiving-side request: authorization, rate limit, the local app."""
        return self._inbound(request)
