"""Last-known-good: the applied config on disk, in two generations, so a restarted proxy starts from it.

DESIGN.md: "a restarted proxy starts from last-known-good on disk (written atomically:
temp file, fsync, rename)" and "the last endpoint table is persisted with
last-known-good". Layout in `--state-dir`:

    STATE_DIR/
      last-known-good.a.json      one generation each: {"generation", "digest", "release_version",
      last-known-good.b.json       "applied_at", "origin", "endpoints", "endpoints_version",
                                   "envelope" (base64 of the signed release, or null), "high_water"}
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

Loading checks each generation (JSON, bundle present and hashing to its digest, the
endpoint table, an envelope that decodes to the release it claims) and returns the
loadable ones newest first, with the reasons the others were skipped: a corrupt newest
falls back to the previous. Only signatures are not checked here: that needs the
trusted keys (`verify_stored`, used by the control-plane form before it applies one).

The release high-water mark (the highest release version ever applied here, and its
bundle) rides in every generation; loading takes the highest found, even in a
generation that is otherwise corrupt, so a replayed older release is refused after a
restart too.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from starmesh.bundle.canonical import digest_of, is_digest
from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, Envelope, verify_envelope
from starmesh.bundle.errors import BundleError
from starmesh.bundle.files import TEMP_PREFIX, write_atomically
from starmesh.bundle.keys import PublicKey
from starmesh.bundle.release import Release, decode_release
from starmesh.runtime.endpoints import EndpointTable, parse_endpoints
from starmesh.runtime.errors import EndpointsError, LastKnownGoodError

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

Origin = Literal["control-plane", "last-known-good", "file"]
GENERATION_FILES = ("last-known-good.a.json", "last-known-good.b.json")
_BUNDLES = "bundles"
_MAX_GENERATION_BYTES = 32 * 1024 * 1024  # an 8 MiB endpoint table and an envelope fit easily


class _Mark(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    bundle: str


class _Generation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    generation: int
    digest: str
    release_version: int | None
    applied_at: str
    origin: Origin
    endpoints: dict[str, dict[str, list[str]]] = {}
    endpoints_version: int = 0
    envelope: str | None = None
    high_water: _Mark | None = None


class _MarkOnly(msgspec.Struct, frozen=True):
    """What a generation file says about the high-water mark, read even when the rest is corrupt."""

    high_water: _Mark | None = None


@dataclass(frozen=True, slots=True, order=True)
class HighWater:
    """The highest release version applied in this state dir, and the bundle it named."""

    version: int
    bundle: str


@dataclass(frozen=True, slots=True)
class LastKnownGood:
    """A config as persisted: bundle bytes (digest verified), how it was applied, the endpoints,
    and the signed release it came with (None for a `--bundle` file)."""

    data: bytes
    digest: str
    release_version: int | None
    applied_at: str
    origin: Origin
    endpoints: EndpointTable
    endpoints_version: int
    envelope: bytes | None = None
    generation: int = 0


@dataclass(frozen=True, slots=True)
class StoredState:
    """Everything a start needs from the state dir.

    `generations`: the loadable ones, newest first; `problems`: why others were skipped
    (one line each, naming the file); `high_water`: the highest mark found anywhere."""

    generations: tuple[LastKnownGood, ...]
    problems: tuple[str, ...]
    high_water: HighWater | None


def _bundle_name(digest: str) -> str:
    return digest.replace(":", "-") + ".json"


# -- saving --------------------------------------------------------------------------


def save_last_known_good(state_dir: Path, lkg: LastKnownGood, *, high_water: HighWater | None = None) -> None:
    """Persist `lkg` as the newest generation (see the module docstring for the order). Raises OSError."""
    bundles = state_dir / _BUNDLES
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

    bundle_path = bundles / _bundle_name(lkg.digest)
    if not bundle_path.is_file() or digest_of(bundle_path.read_bytes()) != lkg.digest:
        write_atomically(bundle_path, lkg.data)
    meta = _Generation(
        generation=(newest.number if newest is not None else 0) + 1,
        digest=lkg.digest,
        release_version=lkg.release_version,
        applied_at=lkg.applied_at,
        origin=lkg.origin,
        endpoints={s: {v: list(a) for v, a in versions.items()} for s, versions in lkg.endpoints.items()},
        endpoints_version=lkg.endpoints_version,
        envelope=None if lkg.envelope is None else base64.b64encode(lkg.envelope).decode("ascii"),
        high_water=None if mark is None else _Mark(mark.version, mark.bundle),
    )
    write_atomically(state_dir / target, msgspec.json.encode(meta))

    keep = {_bundle_name(lkg.digest)}
    keep.update(_bundle_name(slot.meta.digest) for slot in slots if slot.name != target and slot.meta is not None)
    for directory in (bundles, state_dir):
        for entry in directory.iterdir():
            stale = entry.name.startswith(TEMP_PREFIX) or (directory is bundles and entry.name not in keep)
            if stale and entry.is_file():
                entry.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class _Slot:
    """One generation file as found: decoded (`meta`), loadable (`lkg`), or why not (`problem`)."""

    name: str
    meta: _Generation | None
    lkg: LastKnownGood | None
    problem: str | None
    mark: HighWater | None

    @property
    def number(self) -> int:
        return -1 if self.meta is None else self.meta.generation

    def same_config(self, lkg: LastKnownGood) -> bool:
        return self.meta is not None and (self.meta.digest, self.meta.release_version) == (
            lkg.digest,
            lkg.release_version,
        )


def _scan(state_dir: Path) -> list[_Slot]:
    """Both slots, each checked as far as it goes; missing slots are left out."""
    found: list[_Slot] = []
    for name in GENERATION_FILES:
        path = state_dir / name
        try:
            raw = _read_capped(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(_Slot(name, None, None, f"{path}: cannot read: {exc.strerror or exc}", None))
            continue
        except LastKnownGoodError as exc:
            found.append(_Slot(name, None, None, str(exc), None))
            continue
        mark: HighWater | None = None
        try:
            only = msgspec.json.decode(raw, type=_MarkOnly)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        else:
            mark = None if only.high_water is None else _from_mark(only.high_water)
        try:
            meta = msgspec.json.decode(raw, type=_Generation)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            found.append(_Slot(name, None, None, f"{path}: corrupt: {exc}", mark))
            continue
        try:
            lkg = _load_generation(state_dir, path, meta)
        except LastKnownGoodError as exc:
            found.append(_Slot(name, meta, None, str(exc), mark))
            continue
        found.append(_Slot(name, meta, lkg, None, mark))
    return found


def _from_mark(mark: _Mark) -> HighWater:
    return HighWater(mark.version, mark.bundle)


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


def _read_capped(path: Path) -> bytes:
    with open(path, "rb") as file:
        raw = file.read(_MAX_GENERATION_BYTES + 1)
    if len(raw) > _MAX_GENERATION_BYTES:
        raise LastKnownGoodError(f"{path}: corrupt: over {_MAX_GENERATION_BYTES} bytes")
    return raw


def _load_generation(state_dir: Path, path: Path, meta: _Generation) -> LastKnownGood:
    if not is_digest(meta.digest):
        raise LastKnownGoodError(f"{path}: corrupt: digest {meta.digest!r} is not sha256:<hex>")
    bundle_path = state_dir / _BUNDLES / _bundle_name(meta.digest)
    try:
        data = bundle_path.read_bytes()
    except OSError as exc:
        raise LastKnownGoodError(
            f"{bundle_path}: the bundle {meta.digest} that {path.name} names cannot be read: {exc.strerror or exc}"
        ) from exc
    actual = digest_of(data)
    if actual != meta.digest:
        raise LastKnownGoodError(f"{bundle_path}: corrupt: its bytes hash to {actual}, not {meta.digest}")
    try:
        endpoints = parse_endpoints(msgspec.json.encode(meta.endpoints), f"{path}: endpoints")
    except EndpointsError as exc:
        raise LastKnownGoodError(str(exc)) from exc
    envelope: bytes | None = None
    if meta.envelope is not None:
        try:
            envelope = base64.b64decode(meta.envelope, validate=True)
            _check_release(_unverified_release(envelope), meta.digest, meta.release_version)
        except (binascii.Error, ValueError, BundleError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise LastKnownGoodError(f"{path}: corrupt: its release envelope: {exc}") from exc
    return LastKnownGood(
        data=data,
        digest=meta.digest,
        release_version=meta.release_version,
        applied_at=meta.applied_at,
        origin=meta.origin,
        endpoints=endpoints,
        endpoints_version=meta.endpoints_version,
        envelope=envelope,
        generation=meta.generation,
    )


def _unverified_release(envelope: bytes) -> Release:
    """The release an envelope carries, signature not checked (a well-formedness check of a file)."""
    parsed = msgspec.json.decode(envelope, type=Envelope)
    if parsed.payload_type != RELEASE_PAYLOAD_TYPE:
        raise BundleError(f"payloadType is {parsed.payload_type!r}, expected {RELEASE_PAYLOAD_TYPE!r}")
    return decode_release(base64.b64decode(parsed.payload, validate=True))


def _check_release(release: Release, digest: str, version: int | None) -> None:
    if (release.bundle, release.version) != (digest, version):
        raise BundleError(
            f"it is release {release.version} of bundle {release.bundle}, "
            f"but the generation says release {version} of bundle {digest}"
        )


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
    try:
        release = decode_release(verify_envelope(lkg.envelope, trusted, payload_type=RELEASE_PAYLOAD_TYPE))
        _check_release(release, lkg.digest, lkg.release_version)
    except BundleError as exc:
        raise LastKnownGoodError(f"{where}: its release does not verify: {exc}") from exc
    return release
