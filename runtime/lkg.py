"""Last-known-good: the applied config on disk, in two generations, so a restarted proxy starts from it.

DESIGN.md: "a restarted proxy starts from last-known-good on disk (written atomically:
temp file, fsync, rename)" and "the last endpoint table is persisted with
last-known-good". Layout in `--state-dir`:

    STATE_DIR/
      last-known-good.a.json      one generation each: the config, its endpoints, its signed
      last-known-good.b.json       release and the high-water mark (lkg_generation.py)
      bundles/sha256-<hex>.json   the bundles the generations name, by digest

The two files are two slots; the one with the higher `generation` is the newest. A save

    1. writes the bundle file (skipped when it is there and hashes right),
    2. writes the generation file (release envelope inline) into a slot: the older
       generation's slot for a new bundle or release, the newest's own slot when only the
       endpoints or the origin changed (so the other slot keeps the previous config),
    3. deletes bundles neither slot names, and temp files a crash left behind.

Each write is `write_atomically` (temp file, fsync, rename, directory fsync), so a kill -9
at any moment leaves each slot either as it was or fully written, and the bundles both
slots name are only deleted after step 2: at least one loadable generation survives.

Loading checks each generation (`lkg_generation.read_slot`) and returns the loadable
ones newest first, with the reasons the others were skipped: a corrupt newest falls
back to the previous. Only signatures are not checked on load: that needs the trusted
keys (`verify_stored`, used by the control-plane form before it applies one).

The release high-water mark (the highest release version ever applied here, and its
bundle) rides in every generation; loading takes the highest found, even in a
generation that is otherwise corrupt, so a replayed older release is refused after a
restart too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.errors import BundleError
from starmesh.bundle.files import TEMP_PREFIX, write_atomically
from starmesh.runtime.errors import LastKnownGoodError
from starmesh.runtime.lkg_generation import (
    BUNDLES,
    HighWater,
    LastKnownGood,
    Origin,
    Slot,
    bundle_name,
    check_release,
    encode_generation,
    read_slot,
)

if TYPE_CHECKING:  # signatures (cryptography) are checked in the control-plane form only
    from starmesh.bundle.keys import PublicKey
    from starmesh.bundle.release import Release

__all__ = [
    "GENERATION_FILES",
    "HighWater",
    "LastKnownGood",
    "Origin",
    "StoredState",
    "load_last_known_good",
    "load_state",
    "save_last_known_good",
    "verify_stored",
]

GENERATION_FILES = ("last-known-good.a.json", "last-known-good.b.json")


@dataclass(frozen=True, slots=True)
class StoredState:
    """Everything a start needs from the state dir.

    `generations`: the loadable ones, newest first; `problems`: why others were skipped
    (one line each, naming the file); `high_water`: the highest mark found anywhere."""

    generations: tuple[LastKnownGood, ...]
    problems: tuple[str, ...]
    high_water: HighWater | None


# -- saving --------------------------------------------------------------------------


def save_last_known_good(state_dir: Path, lkg: LastKnownGood, *, high_water: HighWater | None = None) -> None:
    """Persist `lkg` as the newest generation (see the module docstring for the order). Raises OSError."""
    bundles = state_dir / BUNDLES
    bundles.mkdir(parents=True, exist_ok=True)
    slots = _scan(state_dir)
    decoded = [slot for slot in slots if slot.meta is not None]
    newest = max(decoded, key=lambda slot: slot.number) if decoded else None
    if newest is not None and newest.same_config(lkg):
        target = newest.name  # only endpoints or origin changed: the other slot keeps the previous config
    else:
        loadable = [slot for slot in slots if slot.lkg is not None]
        keep_slot = max(loadable, key=lambda slot: slot.number) if loadable else newest
        target = next(name for name in GENERATION_FILES if keep_slot is None or name != keep_slot.name)
    marks = [slot.mark for slot in slots if slot.mark is not None]
    if lkg.release_version is not None:
        marks.append(HighWater(lkg.release_version, lkg.digest))
    if high_water is not None:
        marks.append(high_water)
    mark = max(marks) if marks else None

    bundle_path = bundles / bundle_name(lkg.digest)
    if not bundle_path.is_file() or digest_of(bundle_path.read_bytes()) != lkg.digest:
        write_atomically(bundle_path, lkg.data)
    number = (newest.number if newest is not None else 0) + 1
    write_atomically(state_dir / target, encode_generation(lkg, number, mark))

    keep = {bundle_name(lkg.digest)}
    keep.update(bundle_name(slot.meta.digest) for slot in slots if slot.name != target and slot.meta is not None)
    for directory in (bundles, state_dir):
        for entry in directory.iterdir():
            stale = entry.name.startswith(TEMP_PREFIX) or (directory is bundles and entry.name not in keep)
            if stale and entry.is_file():
                entry.unlink(missing_ok=True)


def _scan(state_dir: Path) -> list[Slot]:
    """Both slots, each checked as far as it goes; missing slots are left out."""
    return [slot for name in GENERATION_FILES if (slot := read_slot(state_dir, name)) is not None]


# -- loading -------------------------------------------------------------------------


def load_state(state_dir: Path) -> StoredState:
    """Every loadable generation (newest first), why the others are not, and the high-water mark."""
    slots = _scan(state_dir)
    generations = sorted((slot.lkg for slot in slots if slot.lkg is not None), key=lambda g: g.generation, reverse=True)
    problems = tuple(slot.problem for slot in slots if slot.problem is not None)
    marks = [slot.mark for slot in slots if slot.mark is not None]
    return StoredState(tuple(generations), problems, max(marks) if marks else None)


def load_last_known_good(state_dir: Path) -> LastKnownGood | None:
    """The newest loadable generation; None when there is none at all; LastKnownGoodError
    (saying why, per file) when there are generation files but none of them loads."""
    state = load_state(state_dir)
    if state.generations:
        return state.generations[0]
    if state.problems:
        raise LastKnownGoodError("; ".join(state.problems))
    return None


def verify_stored(lkg: LastKnownGood, trusted: Sequence[PublicKey]) -> Release:
    """Check a stored generation's release against the trusted keys (signature, and that it names
    this bundle and version; not expiry: a data plane outlives an absent control plane).

    Raises LastKnownGoodError saying why (a generation without a release cannot pass)."""
    where = f"last-known-good generation {lkg.generation} ({lkg.digest})"
    if lkg.envelope is None:
        raise LastKnownGoodError(
            f"{where} has no signed release (it came from a --bundle file); "
            "the control-plane form applies only signed releases"
        )
    from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, verify_envelope
    from starmesh.bundle.release import decode_release

    try:
        release = decode_release(verify_envelope(lkg.envelope, trusted, payload_type=RELEASE_PAYLOAD_TYPE))
        check_release(release, lkg.digest, lkg.release_version)
    except BundleError as exc:
        raise LastKnownGoodError(f"{where}: its release does not verify: {exc}") from exc
    return release
