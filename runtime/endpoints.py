"""The endpoint table: where each service version can be reached.

    service -> version -> ("host:port", ...)

Two sources merge into one view (DESIGN.md, "Topology"): the static `endpoints=` of the
applied bundle's services, and the registered table (`--endpoints FILE` in local
development; the control plane's `/v1/endpoints` later). Per version, static endpoints
come first, then registered ones not already listed. Updating replaces the merged view
whole (one reference assignment), so a reader sees the old table or the new one.

    endpoints.get("reviews", "v2")   # ("127.0.0.1:9082",)
    endpoints.get("reviews")         # every version's, deduplicated, in a stable order
    endpoints.update(table, version=n)   # the control plane's feed: one method

An endpoint file is JSON `{"service": {"version": ["host:port", ...]}}` (DESIGN.md,
"Command line"); `parse_endpoints` checks it and says where it is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import msgspec

from starmesh.bundle.spec import Spec
from starmesh.runtime.errors import EndpointsError

__all__ = [
    "EndpointTable",
    "Endpoints",
    "check_endpoints",
    "parse_address",
    "parse_endpoints",
    "static_endpoints",
]

EndpointTable = Mapping[str, Mapping[str, tuple[str, ...]]]
"""service -> version -> ("host:port", ...)."""

_Merged = dict[str, dict[str | None, tuple[str, ...]]]
_NONE: tuple[str, ...] = ()
_EMPTY_TABLE: EndpointTable = MappingProxyType({})


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split `HOST:PORT` (`[v6]:PORT` for IPv6) and check it; raise ValueError saying why.

    Port 0 (an ephemeral port) is only meaningful for a listener: `allow_port_zero`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 host in brackets, e.g. [::1]:8080")
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"{text!r} has no valid host (e.g. 127.0.0.1:8080)")
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 1 to 65535")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not a number from {low} to 65535")
    return host, port


def parse_endpoints(data: bytes, where: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """Decode and check an endpoint table; `where` names its origin in errors (a file path).

    Raises EndpointsError for anything but `{"service": {"version": ["host:port", ...]}}`."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise EndpointsError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EndpointsError(f'{where}: expected an object {{"service": {{"version": ["host:port", ...]}}}}')
    table: dict[str, dict[str, tuple[str, ...]]] = {}
    for service, versions in raw.items():
        if not service:
            raise EndpointsError(f"{where}: a service name is empty")
        if not isinstance(versions, dict):
            raise EndpointsError(f'{where}: service {service!r}: expected an object {{"version": ["host:port", ...]}}')
        table[service] = {}
        for version, addresses in versions.items():
            at = f"{where}: {service}/{version}"
            if not version:
                raise EndpointsError(f"{where}: service {service!r} has an empty version name")
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise EndpointsError(f'{at}: expected a list of "host:port" strings')
            for address in addresses:
                try:
                    parse_address(address)
                except ValueError as exc:
                    raise EndpointsError(f"{at}: {exc}") from None
            table[service][version] = tuple(dict.fromkeys(addresses))
    return table


def check_endpoints(table: EndpointTable, spec: Spec, where: str) -> None:
    """Check that every service and version of `table` is declared by the bundle's spec.

    Used for endpoint tables given together with a bundle (`--bundle` with `--endpoints`),
    where a name the bundle does not know is a typo. Raises EndpointsError."""
    for service, versions in table.items():
        declared = spec.services.get(service)
        if declared is None:
            known = ", ".join(sorted(spec.services)) or "none"
            raise EndpointsError(f"{where}: service {service!r} is not declared by the bundle (services: {known})")
        for version in versions:
            if version not in declared.versions:
                raise EndpointsError(
                    f"{where}: service {service!r} has no version {version!r} "
                    f"(declared: {', '.join(declared.versions)})"
                )


def static_endpoints(spec: Spec, where: str = "bundle") -> dict[str, dict[str, tuple[str, ...]]]:
    """The static `endpoints=` of a spec's services, addresses checked (EndpointsError)."""
    table: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, service in spec.services.items():
        if not service.endpoints:
            continue
        for version, addresses in service.endpoints.items():
            for address in addresses:
                try:
                    parse_address(address)
                except ValueError as exc:
                    raise EndpointsError(f"{where}: service/{name} endpoints {version}: {exc}") from None
        table[name] = {version: tuple(dict.fromkeys(addrs)) for version, addrs in service.endpoints.items()}
    return table


def _merge(static: EndpointTable, registered: EndpointTable) -> _Merged:
    merged: _Merged = {}
    for source in (static, registered):
        for service, versions in source.items():
            by_version = merged.setdefault(service, {})
            for version, addresses in versions.items():
                have = by_version.get(version, _NONE)
                by_version[version] = have + tuple(a for a in addresses if a not in have)
    for by_version in merged.values():
        every: dict[str, None] = {}
        for addresses in list(by_version.values()):
            every.update(dict.fromkeys(addresses))
        by_version[None] = tuple(every)
    return merged


class Endpoints:
    """The live endpoint table: the bundle's static endpoints merged with registered ones.

    `get` is the per-request read (two dict lookups); the writers (`update`,
    `set_static`) rebuild the merged view off to the side and assign it once.
    `version` counts changes of the registered table as its source numbers them
    (the control plane's N; 0 for a file)."""

    __slots__ = ("_static", "_registered", "_merged", "version")

    def __init__(self, registered: EndpointTable | None = None, *, version: int = 0) -> None:
        self._static: EndpointTable = _EMPTY_TABLE
        self._registered: EndpointTable = _EMPTY_TABLE if registered is None else _freeze(registered)
        self._merged: _Merged = _merge(self._static, self._registered)
        self.version = version

    def get(self, service: str, version: str | None = None) -> tuple[str, ...]:
        """The endpoints of one version, or of every version (None): `("host:port", ...)`."""
        by_version = self._merged.get(service)
        if by_version is None:
            return _NONE
        return by_version.get(version, _NONE)

    def update(self, registered: EndpointTable, *, version: int | None = None) -> None:
        """Replace the registered table whole (a file re-read, the control plane's answer)."""
        frozen = _freeze(registered)
        self._merged = _merge(self._static, frozen)
        self._registered = frozen
        if version is not None:
            self.version = version

    def set_static(self, static: EndpointTable) -> None:
        """Replace the static part (the applied bundle's `endpoints=`)."""
        frozen = _freeze(static)
        self._merged = _merge(frozen, self._registered)
        self._static = frozen

    @property
    def registered(self) -> EndpointTable:
        """The registered table (what last-known-good persists)."""
        return self._registered

    def addresses(self) -> frozenset[str]:
        """Every endpoint in the merged view (the pools to keep across an apply)."""
        return frozenset(a for by_version in self._merged.values() for a in by_version.get(None, _NONE))

    def to_json(self) -> dict[str, dict[str, list[str]]]:
        """The merged view as JSON-ready data."""
        return {
            service: {v: list(addrs) for v, addrs in by_version.items() if v is not None}
            for service, by_version in self._merged.items()
        }


def _freeze(table: EndpointTable) -> EndpointTable:
    return MappingProxyType(
        {service: MappingProxyType({v: tuple(a) for v, a in versions.items()}) for service, versions in table.items()}
    )
