"""Preview before rollout: the semantic comparison behind `starmesh diff`.

    model      Change, DiffReport, RequestImpact, Side, the risk labels
    semantic   diff_specs(old, new): mesh, services, routes -> changes (pairs objects by key)
    access     diff_access(old, new): authorization as caller -> service edges gained or lost
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
    from starmesh.preview.model import Change, DiffReport, Outcome, RequestImpact, Side, TestChanges

__all__ = ["Change", "DiffReport", "Outcome", "RequestImpact", "Side", "TestChanges"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {name: "starmesh.preview.model" for name in __all__},
    __all__,
)
