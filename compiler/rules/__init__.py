"""The lint rules that run on a built Spec: cross-object references and warnings.

Each rule is a function `(LintContext) -> Iterable[Finding]` in a small module named for
the family it belongs to; `RULES` lists them all with the code they report. The per-call
checks (types, ranges, duplicates: SM2xx, SM301/302/305/306) happen while the Spec is
built, not here, so nothing here repeats them (an empty http_route, a circuit-breaker
cap or burst of 0 are SM207 there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.rules.callgraph import retry_amplification, timeout_inversion
from starmesh.compiler.rules.context import LintContext
from starmesh.compiler.rules.references import unknown_services, unknown_versions
from starmesh.compiler.rules.resilience import per_try_not_shorter, retries_unbounded
from starmesh.compiler.rules.security import (
    admits_nothing,
    audit_mode,
    relaxed_mtls,
    sources_without_mtls,
    wide_open_access,
)
from starmesh.compiler.rules.shadowing import shadowed_by_catch_all, shadowed_by_earlier_rule
from starmesh.compiler.rules.traffic import dead_versions, fault_everything, mirror_to_live_version, no_op_settings

__all__ = ["RULES", "LintContext", "LintRule"]

LintRule = Callable[[LintContext], Iterable[Finding]]

RULES: dict[str, LintRule] = {
    "SM303": unknown_services,
    "SM304": unknown_versions,
    "SM401": shadowed_by_catch_all,
    "SM402": retries_unbounded,
    "SM403": sources_without_mtls,
    "SM404": mirror_to_live_version,
    "SM405": timeout_inversion,
    "SM406": retry_amplification,
    "SM407": audit_mode,
    "SM408": per_try_not_shorter,
    "SM409": dead_versions,
    "SM410": fault_everything,
    "SM411": shadowed_by_earlier_rule,
    "SM412": admits_nothing,
    "SM413": no_op_settings,
    "SM414": relaxed_mtls,
    "SM415": wide_open_access,
}
"""Every Spec-level rule, keyed by the one code it reports."""
