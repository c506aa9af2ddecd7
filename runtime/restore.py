"""Starting from last-known-good: the newest stored generation that verifies and applies.

    load_state(state_dir)  ─► generations, newest first (and why others were skipped)
        │  for each: control-plane form only: verify_stored (trusted signature, the
        │            release names this bundle and version; not expiry)
        ▼            then Applier.apply(origin="last-known-good")
    the first that applies is live; when none does, the reasons, for `not ready: ...`

A generation that fails here is skipped for the previous one, so a corrupt or
untrusted newest falls back instead of leaving the proxy with nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from starmesh.runtime.apply import Applier
from starmesh.runtime.errors import LastKnownGoodError
from starmesh.runtime.lkg import StoredState, verify_stored

if TYPE_CHECKING:
    from starmesh.bundle.keys import PublicKey

__all__ = ["restore_last_known_good"]

log = logging.getLogger("starmesh.proxy")


async def restore_last_known_good(
    applier: Applier, state: StoredState, *, state_dir: Path, trusted: Sequence[PublicKey] | None
) -> str | None:
    """Apply the newest usable generation: None when one was applied, else why none was.

    With `trusted` (the control-plane form) a generation's signed release must verify;
    without (the `--bundle` form) its bundle digest, checked on load, suffices."""
    reasons = list(state.problems)
    for problem in state.problems:
        log.error("last-known-good: %s", problem)
    for lkg in state.generations:
        if trusted is not None:
            try:
                verify_stored(lkg, trusted)
            except LastKnownGoodError as exc:
                log.error("not applying %s", exc)
                reasons.append(str(exc))
                continue
        result = await applier.apply(
            lkg.data,
            expected_digest=lkg.digest,
            release_version=lkg.release_version,
            origin="last-known-good",
            endpoints=lkg.endpoints,
            endpoints_version=lkg.endpoints_version,
            envelope=lkg.envelope,
        )
        if result.ok:
            log.info(
                "started from last-known-good generation %s: %s (release %s)",
                lkg.generation, lkg.digest, lkg.release_version,
            )
            return None
        reasons.append(f"last-known-good {lkg.digest} not applied either: {result.error}")
    if not reasons:
        return f"no last-known-good in {state_dir}"
    return "last-known-good ignored: " + "; ".join(reasons)
