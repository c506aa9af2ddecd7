"""What a rollout is asked to do, and what it has done so far, as the ledger keeps it.

    RolloutPolicy   a bundle's `mesh(rollout = rollout(canary_percent, bake, max_failures))`
    RolloutState    the ledger's `rollout/state`: JSON, rewritten by the rollout whenever its
                    phase, canaries, ACKs or failures change, read back after a restart

        {"version": 7, "phase": "canary", "policy": {"canary_percent": 20, "bake_seconds": 60.0,
         "max_failures": 0}, "stable": 6, "canary": ["p3"], "acked": ["p3"], "failures": {},
         "bake_until": null, "halted_reason": null}

Versions name ledger releases. `bake_until` is a wall-clock number from the rollout's
injectable clock. Unknown fields are refused: a state written by a newer control plane
is reported as corrupt rather than half read. The state machine that moves a
`RolloutState` from phase to phase is rollout.py's `Rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from starmesh.bundle.canonical import decode_bundle
from starmesh.bundle.errors import BundleError
from starmesh.reconciler.errors import StoreError, UnknownBundle
from starmesh.reconciler.ledger import Ledger

__all__ = ["Phase", "RolloutPolicy", "RolloutState", "stored_policy"]

Phase = Literal["canary", "baking", "promoted", "complete", "halted"]


@dataclass(frozen=True)
class RolloutPolicy:
    """`mesh(rollout = rollout(...))`: canary share of live proxies, bake time, tolerated failures."""

    canary_percent: int | float = 0
    bake_seconds: float = 0.0
    max_failures: int = 0

    @classmethod
    def from_bundle(cls, data: bytes) -> RolloutPolicy:
        """The policy in a bundle's `spec.mesh.rollout`; BundleError when it does not decode."""
        rollout = decode_bundle(data).spec.mesh.rollout
        return cls(rollout.canary_percent, rollout.bake_ms / 1000, rollout.max_failures)


def stored_policy(ledger: Ledger, digest: str) -> RolloutPolicy:
    """The policy of the stored bundle `digest`; the default (no canaries) when it is
    missing or does not decode."""
    try:
        return RolloutPolicy.from_bundle(ledger.bundle(digest))
    except (BundleError, UnknownBundle):
        return RolloutPolicy()


class RolloutState(msgspec.Struct, forbid_unknown_fields=True):
    """The rollout's own record, as `rollout/state` holds it (versions name ledger releases)."""

    version: int
    phase: Phase
    policy: RolloutPolicy
    stable: int | None = None
    canary: list[str] = []
    acked: set[str] = set()
    failures: dict[str, str] = {}  # proxy id -> reason, in the order they happened
    bake_until: float | None = None
    halted_reason: str | None = None

    def encode(self) -> bytes:
        """The JSON the ledger stores."""
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, raw: bytes) -> RolloutState:
        """A stored state; StoreError saying what to do when it does not decode."""
        try:
            return msgspec.json.decode(raw, type=cls)
        except msgspec.MsgspecError as exc:
            raise StoreError(f"rollout/state is corrupt ({exc}); delete it to restart from the newest release") from exc
