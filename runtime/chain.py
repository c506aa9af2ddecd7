"""Assemble the filter chain for one route (calling side) or the local service (receiving side).

Built once per route when a bundle is applied (RouteTable.build); a request only runs
it. A filter with nothing to do for a route is left out of that route's chain, so an
unconfigured concern costs nothing per request. Outermost first:

    outbound  telemetry → split → fault → request headers → mirror → timeout → retry
              → circuit breaker → load balancer (+ outlier detection) → upstream
    inbound   telemetry → authorization → rate limit → upstream (the local app)
    answered  telemetry → the proxy's own answer (no route, not ready: `build_answering`)

On a route with retries the retry filter also runs the timeout's deadline and holds
the breaker's slot around each try (same order and behaviour, two coroutine layers
fewer per request); each concern's logic stays in its own module.

State that must outlive a route table (breaker slots, ejections, buckets, budgets,
mirror slots) comes from `deps.state`, so an apply keeps it.

Origination. With a workload identity (`deps.mtls`, an `OutboundMTLS`), a destination
whose effective mode is strict or permissive gets, once per route, the pool that
originates mTLS to it (`UpstreamPool.originating`, keyed by the SPIFFE ID it expects)
and checks after each handshake that the server's SVID names it, else the connect
fails as `upstream-unavailable`; its load balancer and mirror send through that pool:

    strict      every endpoint over mTLS
    permissive  endpoints registered by proxies over mTLS, static `endpoints=` in plaintext
    disable     `deps.pool` as is (also without a workload identity)
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.routes import PreparedRule, PreparedService
from starmesh.bundle.spec import MeshConfig, MtlsMode
from starmesh.runtime.filters.authorization import authorization_filter
from starmesh.runtime.filters.balancer import EndpointSource, balancer
from starmesh.runtime.filters.circuit_breaker import DEFAULT_BREAKER, circuit_breaker_filter
from starmesh.runtime.filters.fault import fault_filter
from starmesh.runtime.filters.headers import headers_filter
from starmesh.runtime.filters.mirror import mirror_filter
from starmesh.runtime.filters.rate_limit import rate_limit_filter
from starmesh.runtime.filters.retry import retry_filter
from starmesh.runtime.filters.split import split_filter
from starmesh.runtime.filters.telemetry import Observe, telemetry_filter
from starmesh.runtime.filters.timeout import RouteTimeout, timeout_filter
from starmesh.runtime.access_log import AccessLog
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.filters.upstream import Pool, app_handler, mapped_send
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.errors import UpstreamError
from starmesh.runtime.message import Filter, Handler, Request, Response
from starmesh.runtime.state import StateSource
from starmesh.runtime.telemetry import Recorder
from starmesh.runtime.tracing import Tracer
from starmesh.runtime.tls import MeshTLS

__all__ = [
    "ChainDeps",
    "EndpointSource",
    "OutboundMTLS",
    "Pool",
    "ProxyPool",
    "build_answering",
    "build_inbound",
    "build_outbound",
]


class ProxyPool(Pool, Protocol):
    """The proxy's upstream pool as the apply step also uses it (UpstreamPool)."""

    def retain(self, endpoints: frozenset[str]) -> None:
        """Close the pools of endpoints not in `endpoints`."""
        ...


# -- origination: which pool a destination's routes send through -------------------------------


class _PermissivePool:
    """A destination under `permissive`: TLS to endpoints registered by proxies, plaintext to static ones."""

    __slots__ = ("_plain", "_tls", "_service", "_endpoints", "_seen", "_mesh", "active")

    def __init__(self, plain: UpstreamPool, tls: UpstreamPool, service: str, endpoints: Endpoints) -> None:
        self._plain = plain
        self._tls = tls
        self._service = service
        self._endpoints = endpoints
        self._seen: object = None
        self._mesh: frozenset[str] = frozenset()
        self.active = plain.active  # in-flight counts are shared with the TLS pool

    def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Coroutine[Any, Any, Response]:
        registered = self._endpoints.registered
        if registered is not self._seen:  # the table was replaced (one identity check otherwise)
            versions = registered.get(self._service, {})
            self._mesh = frozenset(a for addresses in versions.values() for a in addresses)
            self._seen = registered
        pool = self._tls if endpoint in self._mesh else self._plain
        return pool.send(endpoint, request, host=host)


class OutboundMTLS:
    """Origination for the calling side: the pool a destination service's chain sends through."""

    def __init__(self, pool: UpstreamPool, mesh: MeshTLS, endpoints: Endpoints) -> None:
        self.pool = pool
        self.mesh = mesh
        self.endpoints = endpoints

    def pool_for(self, service: str, mode: MtlsMode, trust_domain: str) -> Pool:
        """`pool` itself under `disable`; else a pool originating TLS that expects `service`'s SVID."""
        if mode == "disable":
            return self.pool
        from starmesh.bundle.identity import spiffe_id  # X.509 code only with a workload identity

        expected = spiffe_id(trust_domain, service)
        mesh = self.mesh

        def verify(endpoint: str, transport: asyncio.BaseTransport) -> None:
            try:
                named = mesh.peer_service(transport, trust_domain, "server")
            except IdentityError as exc:
                raise UpstreamError("upstream-unavailable", f"{endpoint}: not a valid SVID for {service}: {exc}",
                                    sent=False) from exc
            if named != service:
                raise UpstreamError(
                    "upstream-unavailable",
                    f"{endpoint} presented the identity of service {named!r}, not {expected}: connection closed",
                    sent=False,
                )

        def context() -> ssl.SSLContext:
            try:
                return mesh.contexts.client_context()
            except Exception as exc:  # noqa: BLE001 - no certificate yet: this connect fails, not the proxy
                raise UpstreamError("upstream-unavailable", f"no workload certificate to call {service} with mTLS: {exc}",
                                    sent=False) from exc

        tls = self.pool.originating(expected, context, verify)
        return tls if mode == "strict" else _PermissivePool(self.pool, tls, service, self.endpoints)


@dataclass(frozen=True)
class ChainDeps:
    """What the chains need from the running proxy; one per proxy, shared by every table.

    The chains only call `pool.send`/`pool.active` and `endpoints.get`; the apply step
    also uses `pool.retain` and the endpoint table's writers through the same object.

    `local_service`/`local_version` label telemetry (the source on the calling side,
    the destination on the receiving side). `rng`, `clock` (seconds, for outlier
    ejections, rate-limit refill and durations) and `sleep` (backoff, fault delays)
    are injectable so tests are deterministic; deadlines use the event loop's time.
    `mtls` originates mTLS (None: no workload identity, plaintext); `trust_domain` is
    the applied bundle's (RouteTable.build sets it), the one peers' SVIDs must name.
    `tracer` and `access_log` trace and log every request (None: neither, the telemetry
    filter only counts); `mesh` is the bundle's mesh settings they follow (sample_percent,
    access_log): RouteTable.build sets it to the bundle the table is built from."""

    pool: ProxyPool
    endpoints: Endpoints
    state: StateSource
    recorder: Recorder
    local_service: str
    local_version: str = ""
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    mtls: OutboundMTLS | None = None
    trust_domain: str = "cluster.local"
    tracer: Tracer | None = None
    access_log: AccessLog | None = None
    mesh: MeshConfig | None = None


def _route_name(service: str, rule: PreparedRule) -> str:
    """The rule as spans and access-log lines name it: "route/reviews/0 mesh.star:12"."""
    name = f"service/{service}" if rule.index is None else f"route/{service}/{rule.index}"
    return name if rule.location is None else f"{name} {rule.location.file}:{rule.location.line}"


def _assemble(layers: list[Filter | None], terminal: Handler) -> Handler:
    handler = terminal
    for layer in reversed(layers):
        if layer is not None:
            handler = layer(handler)
    return handler


def build_outbound(service: PreparedService, rule: PreparedRule, deps: ChainDeps) -> Handler:
    """The calling side's handler for requests that `rule` of `service` routes."""
    spec = service.spec
    name = service.name
    retries = rule.retries if rule.retries is not None and rule.retries.attempts > 0 else None
    outliers = (
        deps.state.outliers(name, spec.outlier_detection) if spec.outlier_detection is not None else None
    )
    if outliers is not None:  # ejections are counted where they happen (the service's one cell)
        outliers.ejections = deps.recorder.count("outlier_ejections", name)
    # Route timeouts and per-try timeouts are counted per service, where either is configured.
    per_try = retries is not None and retries.per_try_timeout_ms is not None
    timeouts = deps.recorder.count("timeouts", name) if rule.timeout_ms is not None or per_try else None
    # With retries, the retry filter runs the route's timeout itself (one layer fewer).
    fused_timeout = (
        RouteTimeout(rule.timeout_ms, timeouts) if retries is not None and rule.timeout_ms is not None else None
    )
    breaker = deps.state.breaker(name, spec.circuit_breaker or DEFAULT_BREAKER)
    overflows = deps.recorder.count("circuit_breaker_overflows", name)
    # Plaintext, or mTLS originated to this service (chosen once, here, never per request).
    pool = deps.pool if deps.mtls is None else deps.mtls.pool_for(name, service.mtls, deps.trust_domain)
    # The upstream call: raw when the retry filter maps errors itself, mapped otherwise.
    send = pool.send if retries is not None else mapped_send(pool)
    # Load balancing over the picked version's endpoints, outlier ejection feeding back.
    terminal = balancer(
        name,
        spec.load_balancer,
        endpoints=deps.endpoints,
        pool=pool,
        send=send,
        outliers=outliers,
        clock=deps.clock,
        rng=deps.rng,
    )
    layers: list[Filter | None] = [
        # Count, time, trace and log every request, whatever answers it.
        telemetry_filter(
            deps.recorder,
            deps.clock,
            direction="outbound",
            source=deps.local_service,
            destination=name,
            version=None,
            observe=Observe(deps.tracer, deps.access_log, deps.mesh, route=_route_name(name, rule)),
        ),
        # Pick the version once per request, before any retry.
        split_filter(rule, deps.rng),
        # Injected delay, then abort (the route's timeout bounds the delay).
        fault_filter(rule.fault, rule.timeout_ms, deps.rng, deps.sleep),
        # set_request_headers / remove_request_headers.
        headers_filter(rule),
        # Fire-and-forget copies to the mirror version, bounded proxy-wide.
        mirror_filter(
            name,
            rule.mirror,
            rule.timeout_ms,
            endpoints=deps.endpoints,
            pool=pool,
            slots=deps.state.mirrors,
            recorder=deps.recorder,
            rng=deps.rng,
        ),
        # One deadline over the whole request, retries included: 504 `timeout`.
        timeout_filter(rule.timeout_ms, timeouts) if fused_timeout is None else None,
        # More tries within the service's budget, the deadline, idempotence and replayability
        # (and the timeout's deadline when `fused_timeout` is set, and the breaker's slots).
        retry_filter(
            retries, deps.state.budget(name), rng=deps.rng, sleep=deps.sleep, timeout=fused_timeout, breaker=breaker,
            retry_count=deps.recorder.count("retries", name) if retries is not None else None,
            timeout_count=timeouts, overflow_count=overflows,
        ),
        # Slots in flight and a bounded pending queue per service: 503 `overflow`
        # (inside the retry filter when the route retries).
        circuit_breaker_filter(breaker, overflows) if retries is None else None,
    ]
    return _assemble(layers, terminal)


def build_inbound(service: PreparedService | None, deps: ChainDeps, app: str) -> Handler:
    """The receiving side's handler: `service` is the local service (None: not in the bundle)."""
    name = deps.local_service if service is None else service.name
    layers: list[Filter | None] = [
        # Count, time, trace and log every request; the source is the caller's proven identity.
        telemetry_filter(
            deps.recorder,
            deps.clock,
            direction="inbound",
            source=None,
            destination=name,
            version=deps.local_version,
            observe=Observe(
                deps.tracer,
                deps.access_log,
                deps.mesh,
                authorization=service.authorization if service is not None else None,
            ),
        ),
        # The shared decision engine: 403 `denied` (enforce) or a counted would-deny (audit).
        authorization_filter(name, service.authorization if service is not None else None, deps.recorder),
        # The local token bucket: 429 `rate-limited` with Retry-After.
        rate_limit_filter(name, deps.state.bucket(name, service.rate_limit, deps.clock()), deps.clock,
                          deps.recorder.count("rate_limited", name))
        if service is not None and service.rate_limit is not None
        else None,
    ]
    # Forward to the local app: 503 `upstream-unavailable` / `upstream-reset` when it fails.
    return _assemble(layers, app_handler(deps.pool, app))


def build_answering(
    deps: ChainDeps, direction: Literal["outbound", "inbound"], destination: str, answer: Callable[[Request], Response]
) -> Handler:
    """The handler of requests the proxy answers before any chain (404 `no-route`, 503
    `not-ready`): `answer` makes the response, and the telemetry filter counts, logs and
    traces it like a chain's request, under `destination` (a declared service, the local
    one, or "unknown": never a name the request made up, so the label stays bounded)."""

    async def answering(request: Request) -> Response:
        return answer(request)

    outbound = direction == "outbound"
    return telemetry_filter(
        deps.recorder,
        deps.clock,
        direction=direction,
        source=deps.local_service if outbound else None,
        destination=destination,
        version="" if outbound else deps.local_version,
        observe=Observe(deps.tracer, deps.access_log, deps.mesh),
    )(answering)
