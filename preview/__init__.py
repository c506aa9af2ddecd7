"""Preview before rollout: the semantic comparison behind `starmesh diff`.

    model      Change, DiffReport, RequestImpact, Side, the risk labels
    semantic   diff_specs(old, new): mesh, services, routes -> changes (pairs objects by key);
               semantic_mesh, semantic_services, semantic_routes (rule pairing, shadowing),
               semantic_settings (one setting and its risk), semantic_text (summaries)
    access     diff_access(old, new): authorization as caller -> service edges gained or lost
               (access_atoms: the requests compared; access_text: their summaries)
    impact     SampleRequest, load_requests, request_impacts: sample requests before and after
    report     compare(base, head): the whole DiffReport of two bundles

It imports the compiler (for the shadowing analysis lint uses) and the bundle (the
decision engine the proxy runs), never the runtime or the control plane.
"""

# Names resolve on first use (PEP 562), as in the other packages.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
    from starmesh.preview.impact import RequestsFileError, SampleRequest, load_requests, request_impacts
    from starmesh.preview.model import Change, DiffReport, Outcome, RequestImpact, Side, TestChanges
    from starmesh.preview.report import compare

_WHERE = {
    **dict.fromkeys(("Change", "DiffReport", "Outcome", "RequestImpact", "Side", "TestChanges"), "starmesh.preview.model"),
    **dict.fromkeys(("RequestsFileError", "SampleRequest", "load_requests", "request_impacts"), "starmesh.preview.impact"),
    "compare": "starmesh.preview.report",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
