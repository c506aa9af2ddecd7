"""The reconciler package's exceptions.

    ReconcilerError             anything the control plane refuses or cannot do; the message says what
     ├── StoreError             the state store cannot be read or written (path, reason)
     │    ├── StoreUnavailable  etcd cannot be reached (every member tried); read-only until it is back
     │    └── NotLeader         a leader-only write refused: this replica no longer holds the leader lease
     ├── SourceUnavailable      the policy repository or branch cannot be read right now (retry later)
     ├── UnknownBundle          a digest the store does not hold (rollback target, bundle fetch)
     ├── RegistryFull           every one of the registry's `max_proxies` is live: a new proxy is refused
     ├── InvalidRegistration    a heartbeat or report with a malformed id, name, address or digest
     └── CAError                the mesh CA cannot be created or loaded, or refuses a CSR

Foreign errors (OSError, GitCommandError, BundleError) are mapped where they are caught
and re-raised `from exc`, with where it happened in the message.
"""

from __future__ import annotations

__all__ = [
    "CAError",
    "InvalidRegistration",
    "NotLeader",
    "ReconcilerError",
    "RegistryFull",
    "SourceUnavailable",
    "StoreError",
    "StoreUnavailable",
    "UnknownBundle",
]


class ReconcilerError(Exception):
    """Root of the reconciler's exceptions."""


class StoreError(ReconcilerError):
    """The state store cannot be read or written; the message names the key and the reason."""


class StoreUnavailable(StoreError):
    """etcd cannot be reached (every member was tried): serve what the replica holds, read-only."""


class NotLeader(StoreError):
    """A leader-only write was fenced off: another replica holds (or took) the leader lease."""


class SourceUnavailable(ReconcilerError):
    """The repository or branch cannot be read now (missing, fetch failed); the loop retries."""


class UnknownBundle(ReconcilerError):
    """No bundle with this digest was ever stored (rollback answers 404, CLI exits 1)."""


class RegistryFull(ReconcilerError):
    """The registry holds `max_proxies` live proxies; a new one is refused (API: 503)."""


class InvalidRegistration(ReconcilerError):
    """A heartbeat or report with a malformed id, name, address or digest (API: 400)."""


class CAError(ReconcilerError):
    """The mesh CA cannot be created or read (path, reason), or refuses to sign a CSR (API: 400)."""
