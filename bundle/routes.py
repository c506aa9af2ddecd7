"""Prepared services and routing rules: everything the proxy needs, resolved once.

`prepare_service` turns one spec `Service` with its `http_route` rules and its
`authorization` into a `PreparedService`. Effective values are resolved here, never
per request: a rule's timeout and retries override the service's, a service's `mtls`
overrides the mesh's, header names are lower-cased, backend weights become cumulative
sums for the weighted random pick.

A service with no `http_route` gets one implicit catch-all rule (`index` None) that
sends traffic to all its endpoints. Inconsistent input (an unknown version, weights
not summing to 100, an invalid regex) raises BundleError: the proxy relies on this
as part of its own validation of a bundle.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from starmesh.bundle.authz import PreparedAuthorization, prepare_authorization
from starmesh.bundle.errors import BundleError
from starmesh.bundle.match import PreparedMatch, RequestView, prepare_match
from starmesh.bundle.spec import (
    Authorization,
    Fault,
    Mirror,
    MtlsMode,
    RateLimit,
    Retries,
    Rule,
    Service,
    SourceLocation,
    Spec,
)

__all__ = ["PreparedRule", "PreparedService", "equal_shares", "prepare_service"]


@dataclass(frozen=True, slots=True)
class PreparedRule:
    """One routing rule with its effective settings.

    `backends` holds the versions with a positive weight and `cumulative` their running
    sums (the last is 100); both are empty when the rule names no backends, meaning
    "all endpoints of the service". `shares` is what explain and golden requests
    report: the declared weights, or an equal split over the declared versions.
    """

    service: str
    index: int | None
    matches: tuple[PreparedMatch, ...]
    backends: tuple[str, ...]
    cumulative: tuple[int, ...]
    shares: Mapping[str, int]
    timeout_ms: int | None
    retries: Retries | None
    fault: Fault | None
    mirror: Mirror | None
    set_request_headers: tuple[tuple[str, str], ...]
    remove_request_headers: tuple[str, ...]
    location: SourceLocation | None
    _by_roll: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The pick for each whole roll 0..99 (the weights are whole percents, so every
    roll in [k, k+1) picks alike): `pick` is one index instead of a bisect."""

    def __post_init__(self) -> None:
        by_roll = tuple(self._bisect(float(k)) for k in range(100)) if self.backends else ()
        object.__setattr__(self, "_by_roll", by_roll)

    def _bisect(self, roll: float) -> str:
        i = bisect.bisect_right(self.cumulative, roll)
        return self.backends[min(i, len(self.backends) - 1)]

    def applies(self, req: RequestView) -> bool:
        """Whether any match holds (OR); a rule without matches applies to everything."""
        if not self.matches:
            return True
        for match in self.matches:
            if match.test(req):
                return True
        return False

    def pick(self, roll: float) -> str | None:
        """The version for a roll in [0, 100); None when every endpoint is eligible."""
        if not self.backends:
            return None
        if 0.0 <= roll < 100.0:
            return self._by_roll[int(roll)]
        return self._bisect(roll)


@dataclass(frozen=True, slots=True)
class PreparedService:
    """A service's resolved configuration, its rules in order, and its authorization."""

    name: str
    spec: Service
    versions: tuple[str, ...]
    mtls: MtlsMode
    rate_limit: RateLimit | None
    has_routes: bool
    rules: tuple[PreparedRule, ...]
    authorization: PreparedAuthorization | None
    location: SourceLocation | None


def equal_shares(versions: tuple[str, ...]) -> dict[str, int]:
    """Integers summing to 100 over the versions; the remainder goes to the first ones."""
    if not versions:
        return {}
    base, extra = divmod(100, len(versions))
    return {v: base + (1 if i < extra else 0) for i, v in enumerate(versions)}


def _check_version(name: str, version: str, versions: tuple[str, ...], what: str, where: str) -> None:
    if version not in versions:
        declared = ", ".join(versions)
        raise BundleError(
            f"{where}: {what} names version {version!r}, which service {name!r} does not declare ({declared})"
        )


def _prepare_rule(name: str, service: Service, index: int | None, rule: Rule, spec: Spec) -> PreparedRule:
    where = f"route/{name}/{index}" if index is not None else f"service/{name}"
    matches = tuple(prepare_match(m, where) for m in rule.match)
    backends: list[str] = []
    cumulative: list[int] = []
    if rule.backends is not None:
        if not rule.backends:
            raise BundleError(f"{where}: backends is empty; omit it to send traffic to all endpoints")
        total = 0
        for version, weight in rule.backends.items():
            _check_version(name, version, service.versions, "backends", where)
            if weight < 0:
                raise BundleError(f"{where}: backend {version!r} has a negative weight {weight}")
            total += weight
            if weight > 0:
                backends.append(version)
                cumulative.append(total)
        if total != 100:
            raise BundleError(f"{where}: backend weights sum to {total}, not 100")
        shares: dict[str, int] = dict(rule.backends)
    else:
        shares = equal_shares(service.versions)
    if rule.mirror is not None:
        _check_version(name, rule.mirror.version, service.versions, "mirror", where)
    return PreparedRule(
        service=name,
        index=index,
        matches=matches,
        backends=tuple(backends),
        cumulative=tuple(cumulative),
        shares=MappingProxyType(shares),
        timeout_ms=rule.timeout_ms if rule.timeout_ms is not None else service.timeout_ms,
        retries=rule.retries if rule.retries is not None else service.retries,
        fault=rule.fault,
        mirror=rule.mirror,
        set_request_headers=tuple((k.lower(), v) for k, v in sorted(rule.set_request_headers.items())),
        remove_request_headers=tuple(h.lower() for h in rule.remove_request_headers),
        location=spec.source_map.get(where) if index is not None else None,
    )


def prepare_service(
    name: str, service: Service, rules: tuple[Rule, ...] | None, authorization: Authorization | None, spec: Spec
) -> PreparedService:
    """Prepare one service; `rules` None means the service has no `http_route`."""
    if not service.versions:
        raise BundleError(f"service/{name}: declares no versions")
    if service.endpoints is not None:
        for version in service.endpoints:
            _check_version(name, version, service.versions, "endpoints", f"service/{name}")
    prepared: tuple[PreparedRule, ...]
    if rules is None:
        prepared = (_prepare_rule(name, service, None, Rule(), spec),)
    else:
        prepared = tuple(_prepare_rule(name, service, i, rule, spec) for i, rule in enumerate(rules))
    return PreparedService(
        name=name,
        spec=service,
        versions=service.versions,
        mtls=service.mtls if service.mtls is not None else spec.mesh.mtls,
        rate_limit=service.rate_limit,
        has_routes=rules is not None,
        rules=prepared,
        authorization=None if authorization is None else prepare_authorization(name, authorization, spec.source_map),
        location=spec.source_map.get(f"service/{name}"),
    )
