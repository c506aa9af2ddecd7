"""The control plane: follow the policy branch, compile, sign releases, serve proxies.

    watch      RepoSource (the repo and branch), RepoWatcher (wakes the loop on commits)
    reconcile  Reconciler: tip -> compile -> store -> issue -> roll out, one pass at a time
    store      Store, FileStore: durable bytes by key under --state-dir
    ledger     Ledger: bundles, releases, versions, compile status on a Store
    issuer     Issuer: allocate a version, sign, record
    registry   Registry: proxies' heartbeats and reports, the endpoint table
    rollout    Rollout, RolloutPolicy: which release each proxy gets
    api        make_app(ApiDeps): the HTTP API proxies and the CLI talk to
    service    ControlPlane, run_control_plane: the process
    model      the records the parts pass each other; errors: the exception tree

docs/design/issue4-interfaces.md draws how they fit.
"""

# Names resolve on first use (PEP 562): importing one submodule does not import
# the compiler, gitpython, watchdog or aiohttp.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
    from starmesh.reconciler.api import ApiDeps, make_app
    from starmesh.reconciler.errors import ReconcilerError, SourceUnavailable, StoreError, UnknownBundle
    from starmesh.reconciler.issuer import Issuer
    from starmesh.reconciler.ledger import RELEASE_HISTORY, Ledger
    from starmesh.reconciler.model import (
        CompileStatus,
        ProxyRecord,
        ProxyState,
        ReleaseReason,
        ReleaseRecord,
        utc_now,
    )
    from starmesh.reconciler.reconcile import Outcome, ReconcileResult, Reconciler
    from starmesh.reconciler.registry import ProxyEntry, Registry, RegistryFull
    from starmesh.reconciler.rollout import Rollout, RolloutPolicy
    from starmesh.reconciler.service import ControlPlane, ControlPlaneConfig, run_control_plane
    from starmesh.reconciler.store import FileStore, Store
    from starmesh.reconciler.watch import RepoSource, RepoWatcher

__all__ = [
    "RELEASE_HISTORY",
    "ApiDeps",
    "CompileStatus",
    "ControlPlane",
    "ControlPlaneConfig",
    "FileStore",
    "Issuer",
    "Ledger",
    "Outcome",
    "ProxyEntry",
    "ProxyRecord",
    "ProxyState",
    "ReconcileResult",
    "Reconciler",
    "ReconcilerError",
    "Registry",
    "RegistryFull",
    "ReleaseReason",
    "ReleaseRecord",
    "RepoSource",
    "RepoWatcher",
    "Rollout",
    "RolloutPolicy",
    "SourceUnavailable",
    "Store",
    "StoreError",
    "UnknownBundle",
    "make_app",
    "run_control_plane",
    "utc_now",
]

_WHERE: dict[str, str] = {
    "RELEASE_HISTORY": "starmesh.reconciler.ledger",
    "ApiDeps": "starmesh.reconciler.api",
    "CompileStatus": "starmesh.reconciler.model",
    "ControlPlane": "starmesh.reconciler.service",
    "ControlPlaneConfig": "starmesh.reconciler.service",
    "FileStore": "starmesh.reconciler.store",
    "Issuer": "starmesh.reconciler.issuer",
    "Ledger": "starmesh.reconciler.ledger",
    "Outcome": "starmesh.reconciler.reconcile",
    "ProxyEntry": "starmesh.reconciler.registry",
    "ProxyRecord": "starmesh.reconciler.model",
    "ProxyState": "starmesh.reconciler.model",
    "ReconcileResult": "starmesh.reconciler.reconcile",
    "Reconciler": "starmesh.reconciler.reconcile",
    "ReconcilerError": "starmesh.reconciler.errors",
    "Registry": "starmesh.reconciler.registry",
    "RegistryFull": "starmesh.reconciler.registry",
    "ReleaseReason": "starmesh.reconciler.model",
    "ReleaseRecord": "starmesh.reconciler.model",
    "RepoSource": "starmesh.reconciler.watch",
    "RepoWatcher": "starmesh.reconciler.watch",
    "Rollout": "starmesh.reconciler.rollout",
    "RolloutPolicy": "starmesh.reconciler.rollout",
    "SourceUnavailable": "starmesh.reconciler.errors",
    "Store": "starmesh.reconciler.store",
    "StoreError": "starmesh.reconciler.errors",
    "UnknownBundle": "starmesh.reconciler.errors",
    "make_app": "starmesh.reconciler.api",
    "run_control_plane": "starmesh.reconciler.service",
    "utc_now": "starmesh.reconciler.model",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
