"""The rollout's persisted record and the policy a bundle asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from starmesh.reconciler.errors import StoreError
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.rollout import RolloutPolicy as ReExported
from starmesh.reconciler.rollout_state import RolloutPolicy, RolloutState, stored_policy
from starmesh.reconciler.store import FileStore


def test_the_state_round_trips_through_json() -> None:
    state = RolloutState(7, "canary", RolloutPolicy(20, 60.0, 1), stable=6, canary=["p3", "p1"])
    state.acked.add("p3")
    state.failures["p1"] = "NACK of release 7: golden request 'x' failed"
    state.bake_until = 1_800_000_060.5
    again = RolloutState.decode(state.encode())
    assert again == state
    assert again.policy == RolloutPolicy(20, 60.0, 1) and again.acked == {"p3"}
    assert RolloutState(1, "promoted", RolloutPolicy()).canary == [], "defaults are not shared"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"version": 1}', b'{"version": 1, "phase": "done", "policy": {}}',
     b'{"version": 1, "phase": "canary", "policy": {}, "written_by": "a newer control plane"}'],
)  # fmt: skip
def test_a_corrupt_state_says_what_to_do(raw: bytes) -> None:
    with pytest.raises(StoreError, match=r"rollout/state is corrupt \(.+\); delete it to restart"):
        RolloutState.decode(raw)


def test_the_policy_of_a_stored_bundle(tmp_path: Path, h: Any) -> None:
    ledger = Ledger(FileStore(tmp_path / "state"))
    text = h.policy("v1").replace(
        'mtls = "disable"', 'mtls = "disable", rollout = rollout(canary_percent = 25, bake = "2m", max_failures = 3)'
    )
    digest = ledger.put_bundle(h.compile_policy(tmp_path / "policy", text))
    assert stored_policy(ledger, digest) == RolloutPolicy(25, 120.0, 3)
    assert stored_policy(ledger, "sha256:" + "0" * 64) == RolloutPolicy(), "not stored: no canaries"
    assert ReExported is RolloutPolicy, "rollout.py re-exports RolloutPolicy"
