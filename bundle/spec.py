"""The bundle's spec: the validated mesh policy every stage agrees on.

These are the types the compiler emits, the canonical encoding hashes, and the proxy
decodes. They are frozen msgspec Structs: encoding them with sorted keys gives the
canonical bytes (see `starmesh.bundle.canonical`). Durations are integer milliseconds
(field names end in `_ms`); percents are numbers 0-100 (an int when integral, so the
same policy always gives the same bytes).

Field defaults mirror the Starlark builtins' defaults in DESIGN.md, so a spec decoded
from JSON and one built by the compiler are the same value.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "AccessLog",
    "Allow",
    "Authorization",
    "CircuitBreaker",
    "Fault",
    "LoadBalancer",
    "Match",
    "MeshConfig",
    "Mirror",
    "MtlsMode",
    "OutlierDetection",
    "Percent",
    "RateLimit",
    "RequestTest",
    "Retries",
    "Rollout",
    "Rule",
    "Service",
    "SourceLocation",
    "Spec",
    "StringMatch",
    "Tracing",
]

Percent = int | float
MtlsMode = Literal["strict", "permissive", "disable"]
LoadBalancer = Literal["round_robin", "least_request", "random"]
AuthorizationMode = Literal["enforce", "audit"]
RetryOn = Literal["5xx", "connect-failure", "reset"]


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base for every spec type: immutable, strict on decode."""


class SourceLocation(_Frozen, frozen=True):
    """Where a policy object was declared: path relative to the policy root, 1-based."""

    file: str
    line: int
    col: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Tracing(_Frozen, frozen=True):
    """Trace sampling for the whole mesh."""

    sample_percent: Percent = 1


class AccessLog(_Frozen, frozen=True):
    """Access logging for every proxy; lines beyond the rate are dropped and counted."""

    enabled: bool = True
    max_lines_per_second: int = 100


class Rollout(_Frozen, frozen=True):
    """How a new release is staged: canary share of proxies, bake time, tolerated failures."""

    canary_percent: Percent = 0
    bake_ms: int = 0
    max_failures: int = 0


class MeshConfig(_Frozen, frozen=True):
    """Mesh-wide settings from `mesh(...)`."""

    name: str
    trust_domain: str = "cluster.local"
    mtls: MtlsMode = "strict"
    tracing: Tracing = Tracing()
    access_log: AccessLog = AccessLog()
    rollout: Rollout = Rollout()


class Retries(_Frozen, frozen=True):
    """Retry policy. `attempts` counts retries after the first try."""

    attempts: int = 2
    per_try_timeout_ms: int | None = None
    on: tuple[RetryOn, ...] = ("5xx", "connect-failure", "reset")
    budget_percent: Percent = 20


class CircuitBreaker(_Frozen, frozen=True):
    """Caps on concurrent connections, queued requests and active requests to a service."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024


class OutlierDetection(_Frozen, frozen=True):
    """Eject an endpoint after consecutive 5xx; ejection time grows with each ejection."""

    consecutive_5xx: int = 5
    interval_ms: int = 10_000
    base_ejection_time_ms: int = 30_000
    max_ejection_percent: Percent = 50


class RateLimit(_Frozen, frozen=True):
    """Token bucket per receiving proxy; `burst` is the bucket size (starts full)."""

    requests_per_second: Percent
    burst: int


class StringMatch(_Frozen, frozen=True):
    """A header or query value condition: exact text, a full-match regex, or presence."""

    kind: Literal["exact", "regex", "present"]
    value: str | None = None


class Match(_Frozen, frozen=True):
    """All given fields must hold (AND). Path matches ignore the query string."""

    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] | None = None
    headers: dict[str, StringMatch] = {}
    query: dict[str, StringMatch] = {}


class Fault(_Frozen, frozen=True):
    """Injected delay and/or abort, each drawn independently per request."""

    delay_ms: int | None = None
    delay_percent: Percent = 0
    abort_status: int | None = None
    abort_percent: Percent = 0


class Mirror(_Frozen, frozen=True):
    """Fire-and-forget copy of a share of requests to another version."""

    version: str
    percent: Percent = 100


class Rule(_Frozen, frozen=True):
    """One routing rule. Empty `match` matches everything; `backends` None = all endpoints."""

    match: tuple[Match, ...] = ()
    backends: dict[str, int] | None = None
    timeout_ms: int | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    set_request_headers: dict[str, str] = {}
    remove_request_headers: tuple[str, ...] = ()


class Service(_Frozen, frozen=True):
    """A service, its versions and its resilience policy."""

    port: int = 80
    versions: tuple[str, ...] = ("v1",)
    timeout_ms: int | None = None
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    rate_limit: RateLimit | None = None
    load_balancer: LoadBalancer = "round_robin"
    endpoints: dict[str, tuple[str, ...]] | None = None
    mtls: MtlsMode | None = None


class Allow(_Frozen, frozen=True):
    """An authorization rule: every given field must hold; None means any."""

    sources: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None


class Authorization(_Frozen, frozen=True):
    """Requests to the service are denied unless an `allow` admits them."""

    rules: tuple[Allow, ...] = ()
    mode: AuthorizationMode = "enforce"


class RequestTest(_Frozen, frozen=True):
    """A golden request kept in the policy repo and checked against the route table."""

    name: str
    service: str
    path: str = "/"
    method: str = "GET"
    headers: dict[str, str] = {}
    source: str | None = None
    backends: dict[str, Percent] | None = None
    allowed: bool | None = None
    status: int | None = None


class Spec(_Frozen, frozen=True):
    """The whole compiled policy.

    `source_map` maps a policy object's key to where it was declared:
    `mesh`, `service/<name>`, `http_route/<service>`, `route/<service>/<index>`, `authorization/<service>`,
    `authorization/<service>/<index>`, `request_test/<name>`. It is for explanation
    only: the semantic diff ignores it.
    """

    mesh: MeshConfig
    services: dict[str, Service] = {}
    routes: dict[str, tuple[Rule, ...]] = {}
    authorization: dict[str, Authorization] = {}
    request_tests: tuple[RequestTest, ...] = ()
    source_map: dict[str, SourceLocation] = {}
