"""Mesh-wide changes: mTLS, identity (trust domain, name), tracing, access log, rollout.

Every change points at the head's `mesh(...)` call and has no service. The mesh's
mTLS mode is reported here once, even though every service that inherits it changes
with it (the service diff reports only services whose own `mtls` is involved).
"""

from __future__ import annotations

from starmesh.bundle.spec import MeshConfig, Rollout, Spec
from starmesh.preview.model import REMOVES_PROTECTION, Change
from starmesh.preview.semantic_settings import SettingChange, as_change, mtls_change
from starmesh.preview.semantic_text import ARROW, policy_json, settings_change_text

__all__ = ["mesh_changes"]


def _rollout_risk(old: Rollout, new: Rollout) -> tuple[str, ...]:
    """A smaller canary, a shorter bake or more tolerated failures stage releases less."""
    loosened = (
        new.canary_percent < old.canary_percent or new.bake_ms < old.bake_ms or new.max_failures > old.max_failures
    )
    return (REMOVES_PROTECTION,) if loosened else ()


def _identity(what: str, old: str, new: str) -> SettingChange | None:
    if old == new:
        return None
    return SettingChange(f'{what} "{old}" {ARROW} "{new}" (every certificate is re-issued)', old, new)


def _settings(mesh_old: MeshConfig, mesh_new: MeshConfig, what: str) -> SettingChange | None:
    old, new = getattr(mesh_old, what), getattr(mesh_new, what)
    if old == new:
        return None
    risk = _rollout_risk(old, new) if what == "rollout" else ()
    old_json, new_json = policy_json(old), policy_json(new)
    return SettingChange(f"{what} {settings_change_text(old_json, new_json)}", old_json, new_json, risk)


def mesh_changes(old: Spec, new: Spec) -> list[Change]:
    """The mesh-level changes, in a fixed order: mtls, trust_domain, name, tracing,
    access_log, rollout."""
    where = new.source_map.get("mesh")
    found = {
        "mesh.mtls": mtls_change(old.mesh.mtls, new.mesh.mtls),
        "mesh.trust_domain": _identity("trust_domain", old.mesh.trust_domain, new.mesh.trust_domain),
        "mesh.name": _identity("name", old.mesh.name, new.mesh.name),
        "mesh.tracing": _settings(old.mesh, new.mesh, "tracing"),
        "mesh.access_log": _settings(old.mesh, new.mesh, "access_log"),
        "mesh.rollout": _settings(old.mesh, new.mesh, "rollout"),
    }
    return [as_change(None, kind, "mesh", change, where) for kind, change in found.items() if change is not None]
