"""Service-level changes: a service added or removed, its topology, mTLS and resilience.

Services pair by name. Each change points at the head's `service(...)` call (the
base's for a removed service). Settings compare as the service declares them: a
service timeout change is reported once here, not for every rule that inherits it
(rules' own settings are compared in semantic_routes). mTLS compares as the effective
mode, and only when the service's own `mtls` is involved: a change that comes from the
mesh alone is the mesh's `mesh.mtls`.
"""

from __future__ import annotations

from starmesh.bundle.routes import PreparedService
from starmesh.bundle.spec import Service
from starmesh.preview.model import REMOVES_ROUTE, Change
from starmesh.preview.semantic_settings import (
    SettingChange,
    as_change,
    circuit_breaker_change,
    mtls_change,
    outlier_detection_change,
    rate_limit_change,
    retries_change,
    timeout_change,
)
from starmesh.preview.semantic_text import ARROW, policy_json, value_text

__all__ = ["service_changes"]


def _plain(what: str, old: object, new: object) -> SettingChange | None:
    if old == new:
        return None
    old_json, new_json = policy_json(old), policy_json(new)
    text = f"{what} {value_text(what, old_json)} {ARROW} {value_text(what, new_json)}"
    return SettingChange(text, old_json, new_json)


def _mtls(old: PreparedService, new: PreparedService) -> SettingChange | None:
    if old.spec.mtls is None and new.spec.mtls is None:
        return None  # both inherit the mesh's mode: mesh.mtls says it
    return mtls_change(old.mtls, new.mtls)


def _settings(old: PreparedService, new: PreparedService) -> dict[str, SettingChange | None]:
    """Each kind's change, in report order."""
    a, b = old.spec, new.spec
    return {
        "service.mtls": _mtls(old, new),
        "service.versions": _plain("versions", a.versions, b.versions),
        "service.port": _plain("port", a.port, b.port),
        "service.endpoints": _plain("endpoints", a.endpoints, b.endpoints),
        "service.load_balancer": _plain("load_balancer", a.load_balancer, b.load_balancer),
        "service.timeout": timeout_change(a.timeout_ms, b.timeout_ms),
        "service.retries": retries_change(a.retries, b.retries),
        "service.circuit_breaker": circuit_breaker_change(a.circuit_breaker, b.circuit_breaker),
        "service.outlier_detection": outlier_detection_change(a.outlier_detection, b.outlier_detection),
        "service.rate_limit": rate_limit_change(a.rate_limit, b.rate_limit),
    }


def _outline(service: Service) -> str:
    return f"port {service.port}, versions {value_text('versions', list(service.versions))}"


def service_changes(name: str, old: PreparedService | None, new: PreparedService | None) -> list[Change]:
    """The service-level changes of the service `name` (None on the side that lacks it)."""
    if new is None:
        if old is None:
            return []
        what = f"service removed ({_outline(old.spec)}); requests for it get 404 no-route"
        removed = SettingChange(what, policy_json(old.spec), None, (REMOVES_ROUTE,))
        return [as_change(name, "service.removed", name, removed, old.location)]
    if old is None:
        added = SettingChange(f"service added ({_outline(new.spec)})", None, policy_json(new.spec))
        return [as_change(name, "service.added", name, added, new.location)]
    return [
        as_change(name, kind, name, change, new.location)
        for kind, change in _settings(old, new).items()
        if change is not None
    ]
