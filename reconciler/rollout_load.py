"""The rollout's state as the ledger holds it: read at start and on every reload, written on change.

    Rollout(...), reload() ──► load_rollout(ledger) ──► (state, its release, the stable release)
    a change of phase ... ───► save_rollout(ledger, state): `rollout/state`, and the releases
                               it still serves are kept from pruning

A follower's rollout is read-only and reloads whenever the leader has written (issue 9);
a replica that becomes leader reloads once more and carries on from there. A state that
names a release the ledger no longer holds starts afresh (the stable release is kept).
"""

from __future__ import annotations

import logging

from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.model import ReleaseRecord
from starmesh.reconciler.rollout_state import RolloutState

__all__ = ["Loaded", "keep_served", "load_rollout", "save_rollout"]

log = logging.getLogger("starmesh.reconciler.rollout")

Loaded = tuple[RolloutState | None, ReleaseRecord | None, ReleaseRecord | None]
"""(the rollout's state, the release it rolls out, the stable release), each None when absent."""


def load_rollout(ledger: Ledger) -> Loaded:
    """The rollout as `rollout/state` and the releases say; StoreError when the state is corrupt."""
    raw = ledger.rollout_state()
    if raw is None:
        return None, None, None
    s = RolloutState.decode(raw)
    release = ledger.release(s.version)
    stable = None if s.stable is None else ledger.release(s.stable)
    if release is None:
        log.warning("rollout/state names release %d, which the ledger no longer holds: starting afresh", s.version)
        return None, None, stable
    return s, release, stable


def save_rollout(ledger: Ledger, s: RolloutState) -> None:
    """Write the state, and keep the releases it serves from being pruned."""
    ledger.set_rollout_state(s.encode())
    keep_served(ledger, s)


def keep_served(ledger: Ledger, s: RolloutState) -> None:
    """Never prune the rollout's release or the stable one (from now on)."""
    ledger.keep_releases(v for v in (s.version, s.stable) if v is not None)
