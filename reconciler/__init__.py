"""The control plane: follow the policy branch, compile, sign releases, serve proxies.

    source         RepoSource: the repo and branch, read in place or mirrored and fetched
    watch          RepoWatcher: wakes the loop when the branch may have moved
    reconcile      Reconciler: tip -> compile -> store -> issue -> roll out, one pass at a time
    diagnostics    the findings `last_compile` keeps for a rejected commit (bounded)
    store          Store, FileStore: durable bytes by key under --state-dir
    etcd_client    the --store URL; calls that fail over between etcd members
    etcd_store     EtcdStore: the Store on etcd, read from a mirror (etcd_mirror) kept by a watch
    election       LeaderElection: one leader on an etcd lease; its fence guards every write
    replicas       ReplicaSet: each replica's record on its own lease
    registry_sync  RegistrySync: proxies' registrations shared between replicas through etcd
    ha             Replication: those parts put together for one replica (--store)
    ledger         Ledger: bundles, releases, versions, compile status on a Store
    issuer         Issuer: allocate a version, sign, record
    registry       Registry: proxies' heartbeats and reports, the endpoint table
    rollout        Rollout: which release each proxy gets (canary, bake, promote, halt)
    rollout_state  RolloutPolicy, RolloutState: what a rollout is asked, what it persisted
    rollout_load   reading and writing a rollout's state through the ledger (leader and followers)
    change_signal  ChangeSignal: wakes the long-polls (endpoints, releases) on a change
    metrics        ControlPlaneMetrics: compiles, releases, NACKs, rollout as Prometheus text;
                   the Metrics base (NO_METRICS) records nothing
    api            make_app(ApiDeps): the HTTP API proxies and the CLI talk to
    service        ControlPlane, run_control_plane: the process
    model          the records the parts pass each other; errors: the exception tree

docs/design/issue4-interfaces.md draws how they fit; issue9-interfaces.md the replicas.
"""

# Names resolve on first use (PEP 562): importing one submodule does not import
# the compiler, gitpython, watchdog or aiohttp.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
    from starmesh.reconciler.api import ApiDeps, make_app
    from starmesh.reconciler.ca import MeshCA, init_ca, issue_svid, load_ca, server_certificate
    from starmesh.reconciler.certificates import MeshIdentity, ServerTLS
    from starmesh.reconciler.errors import (
        CAError,
        InvalidRegistration,
        ReconcilerError,
        RegistryFull,
        SourceUnavailable,
        StoreError,
        UnknownBundle,
    )
    from starmesh.reconciler.issuer import Issuer
    from starmesh.reconciler.ledger import RELEASE_HISTORY, Ledger
    from starmesh.reconciler.metrics import ControlPlaneMetrics
    from starmesh.reconciler.model import (
        CompileStatus,
        ProxyEntry,
        ProxyRecord,
        ProxyState,
        ReleaseReason,
        ReleaseRecord,
        utc_now,
    )
    from starmesh.reconciler.reconcile import Outcome, ReconcileResult, Reconciler
    from starmesh.reconciler.registry import Registry
    from starmesh.reconciler.rollout import Rollout
    from starmesh.reconciler.rollout_state import RolloutPolicy
    from starmesh.reconciler.service import ControlPlane, ControlPlaneConfig, run_control_plane
    from starmesh.reconciler.source import RepoSource
    from starmesh.reconciler.store import FileStore, Store
    from starmesh.reconciler.watch import RepoWatcher

__all__ = [
    "RELEASE_HISTORY",
    "CAError",
    "MeshCA",
    "MeshIdentity",
    "ServerTLS",
    "init_ca",
    "issue_svid",
    "load_ca",
    "server_certificate",
    "ApiDeps",
    "CompileStatus",
    "ControlPlane",
    "ControlPlaneConfig",
    "ControlPlaneMetrics",
    "FileStore",
    "InvalidRegistration",
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
    "CAError": "starmesh.reconciler.errors",
    "MeshCA": "starmesh.reconciler.ca",
    "MeshIdentity": "starmesh.reconciler.certificates",
    "ServerTLS": "starmesh.reconciler.certificates",
    "init_ca": "starmesh.reconciler.ca",
    "issue_svid": "starmesh.reconciler.ca",
    "load_ca": "starmesh.reconciler.ca",
    "server_certificate": "starmesh.reconciler.ca",
    "CompileStatus": "starmesh.reconciler.model",
    "ControlPlane": "starmesh.reconciler.service",
    "ControlPlaneConfig": "starmesh.reconciler.service",
    "ControlPlaneMetrics": "starmesh.reconciler.metrics",
    "FileStore": "starmesh.reconciler.store",
    "InvalidRegistration": "starmesh.reconciler.errors",
    "Issuer": "starmesh.reconciler.issuer",
    "Ledger": "starmesh.reconciler.ledger",
    "Outcome": "starmesh.reconciler.reconcile",
    "ProxyEntry": "starmesh.reconciler.model",
    "ProxyRecord": "starmesh.reconciler.model",
    "ProxyState": "starmesh.reconciler.model",
    "ReconcileResult": "starmesh.reconciler.reconcile",
    "Reconciler": "starmesh.reconciler.reconcile",
    "ReconcilerError": "starmesh.reconciler.errors",
    "Registry": "starmesh.reconciler.registry",
    "RegistryFull": "starmesh.reconciler.errors",
    "ReleaseReason": "starmesh.reconciler.model",
    "ReleaseRecord": "starmesh.reconciler.model",
    "RepoSource": "starmesh.reconciler.source",
    "RepoWatcher": "starmesh.reconciler.watch",
    "Rollout": "starmesh.reconciler.rollout",
    "RolloutPolicy": "starmesh.reconciler.rollout_state",
    "SourceUnavailable": "starmesh.reconciler.errors",
    "Store": "starmesh.reconciler.store",
    "StoreError": "starmesh.reconciler.errors",
    "UnknownBundle": "starmesh.reconciler.errors",
    "make_app": "starmesh.reconciler.api",
    "run_control_plane": "starmesh.reconciler.service",
    "utc_now": "starmesh.reconciler.model",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
