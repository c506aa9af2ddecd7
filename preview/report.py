"""The whole comparison of two compiled bundles: what `starmesh diff` shows.

    compare(base, head, base_side=..., head_side=..., requests=samples) -> DiffReport
        changes        semantic.diff_specs(base.spec, head.spec): behaviour, with risk
        request_tests  semantic.diff_request_tests: golden requests added/removed/changed
        requests       impact.request_impacts: golden and sample requests before and after

Only the specs are compared: the bundles' `source` (commit, entry file) and the specs'
`source_map` describe where the policy came from, not what the proxies do. Reading the
revisions and compiling them is the command line's job (cli/diff.py); this module
never touches Git or the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from starmesh.bundle.canonical import Bundle
from starmesh.bundle.decide import DecisionTable
from starmesh.preview.impact import SampleRequest, request_impacts
from starmesh.preview.model import DiffReport, Side
from starmesh.preview.semantic import diff_request_tests, diff_specs

__all__ = ["compare"]


def compare(
    base: Bundle,
    head: Bundle,
    *,
    base_side: Side,
    head_side: Side,
    requests: Sequence[SampleRequest] = (),
) -> DiffReport:
    """Compare `head` with `base`; `requests` are tried after both sides' golden requests.

    Raises BundleError when a side's spec cannot be turned into a decision table (never
    for a bundle `compile` produced: it builds the same table before emitting one)."""
    old_table = DecisionTable.build(base.spec)
    new_table = DecisionTable.build(head.spec)
    return DiffReport(
        base=base_side,
        head=head_side,
        changes=tuple(diff_specs(base.spec, head.spec, (old_table, new_table))),
        requests=tuple(request_impacts(old_table, new_table, requests)),
        request_tests=diff_request_tests(base.spec, head.spec),
    )
