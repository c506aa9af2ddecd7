"""The semantic diff of two compiled policies: what would behave differently.

Objects pair by key, as gitops-engine pairs desired and live objects, and each pair is
compared after normalizing (effective shares, effective mTLS):

    the mesh by itself          semantic_mesh       mtls, identity, tracing, access log, rollout
    services by name            semantic_services   added/removed, topology, mTLS, resilience
    routing rules by match      semantic_routes     added/removed/reordered, match, traffic, ...
    authorization by service    access              edges caller -> service gained or lost

Only behaviour counts: the source map (where things were written) and the golden
requests (checks, reported by `diff_request_tests`) never make a change, so a commit
that only edits comments or formatting compares equal. Changes come sorted: the mesh
first, then services by name; within a service its own settings, its routes in head
rule order, its authorization, then access.
"""

from __future__ import annotations

import msgspec

from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.spec import Spec
from starmesh.preview.access import diff_access
from starmesh.preview.model import Change, TestChanges
from starmesh.preview.semantic_mesh import mesh_changes
from starmesh.preview.semantic_routes import route_changes
from starmesh.preview.semantic_services import service_changes

__all__ = ["diff_request_tests", "diff_specs"]


def _behaviour(spec: Spec) -> Spec:
    """The spec without what never changes behaviour: locations and golden requests."""
    return msgspec.structs.replace(spec, source_map={}, request_tests=())


def _access_rank(change: Change) -> int:
    """Authorization changes before access edges; anything else from the access diff last."""
    return {"authorization": 0, "access": 1}.get(change.kind.partition(".")[0], 2)


def diff_specs(
    old: Spec, new: Spec, tables: tuple[DecisionTable, DecisionTable] | None = None
) -> list[Change]:
    """Every behavioural change from `old` (the base) to `new` (the head), sorted.

    Both specs must be valid (compiled); BundleError if one cannot become a table.
    `tables` are the two specs' decision tables when the caller has built them already."""
    if _behaviour(old) == _behaviour(new):
        return []
    old_table, new_table = tables if tables is not None else (DecisionTable.build(old), DecisionTable.build(new))
    access = diff_access(old, new)
    changes = mesh_changes(old, new)
    changes += sorted((c for c in access if c.service is None), key=_access_rank)
    names = {*old.services, *new.services, *(c.service for c in access if c.service is not None)}
    for name in sorted(names):
        before, after = old_table.services.get(name), new_table.services.get(name)
        changes += service_changes(name, before, after)
        if before is not None and after is not None:
            changes += route_changes(old, before, new, after)
        changes += sorted((c for c in access if c.service == name), key=_access_rank)
    return changes


def diff_request_tests(old: Spec, new: Spec) -> TestChanges:
    """Golden requests added, removed or changed, by name (sorted)."""
    before = {t.name: t for t in old.request_tests}
    after = {t.name: t for t in new.request_tests}
    return TestChanges(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(sorted(name for name in before.keys() & after.keys() if before[name] != after[name])),
    )
