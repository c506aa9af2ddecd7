"""One last-known-good generation file: what it holds, and reading one back with every check.

A generation is one JSON file (a slot, see lkg.py) naming its bundle by digest:

    {"generation": 7, "digest": "sha256:…", "release_version": 3, "applied_at": "…Z",
     "origin": "control-plane", "endpoints": {...}, "endpoints_version": 2,
     "envelope": "<base64 of the signed release, or null>",
     "high_water": {"version": 3, "bundle": "sha256:…"}}

    STATE_DIR/bundles/sha256-<hex>.json     the bundle it names

`read_slot` checks a file as far as it goes and says why it stops: the file is read
with a size cap, the high-water mark is read on its own first (it counts even when the
rest is corrupt), then the JSON, the bundle (present, hashing to its digest), the
endpoint table, and an envelope that decodes to the release the generation claims.
Signatures are not checked here: that needs the trusted keys (lkg.verify_stored).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from starmesh.bundle.canonical import digest_of, is_digest
from starmesh.bundle.errors import BundleError
from starmesh.runtime.endpoints import EndpointTable, parse_endpoints
from starmesh.runtime.errors import EndpointsError, LastKnownGoodError

if TYPE_CHECKING:  # releases (and their signing code, cryptography) only where a generation has one
    from starmesh.bundle.release import Release

__all__ = [
    "BUNDLES",
    "HighWater",
    "LastKnownGood",
    "Origin",
    "Slot",
    "bundle_name",
    "check_release",
    "encode_generation",
    "read_slot",
]

Origin = Literal["control-plane", "last-known-good", "file"]
BUNDLES = "bundles"
"""The folder in the state dir that holds the bundles the generations name."""
_MAX_GENERATION_BYTES = 32 * 1024 * 1024  # an 8 MiB endpoint table and an envelope fit easily


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


class _Mark(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    bundle: str


class Generation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A generation file as written (the bundle and envelope by reference and in base64)."""

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


def bundle_name(digest: str) -> str:
    """The file name under `bundles/` of the bundle with this digest."""
    return digest.replace(":", "-") + ".json"


def encode_generation(lkg: LastKnownGood, number: int, mark: HighWater | None) -> bytes:
    """The generation file's bytes for `lkg` as generation `number`, carrying the high-water `mark`."""
    meta = Generation(
        generation=number,
        digest=lkg.digest,
        release_version=lkg.release_version,
        applied_at=lkg.applied_at,
        origin=lkg.origin,
        endpoints={s: {v: list(a) for v, a in versions.items()} for s, versions in lkg.endpoints.items()},
        endpoints_version=lkg.endpoints_version,
        envelope=None if lkg.envelope is None else base64.b64encode(lkg.envelope).decode("ascii"),
        high_water=None if mark is None else _Mark(mark.version, mark.bundle),
    )
    return msgspec.json.encode(meta)


@dataclass(frozen=True, slots=True)
class Slot:
    """One generation file as found: decoded (`meta`), loadable (`lkg`), or why not (`problem`)."""

    name: str
    meta: Generation | None
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


def read_slot(state_dir: Path, name: str) -> Slot | None:
    """The generation file `state_dir/name`, checked as far as it goes; None when there is none."""
    path = state_dir / name
    try:
        raw = _read_capped(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Slot(name, None, None, f"{path}: cannot read: {exc.strerror or exc}", None)
    except LastKnownGoodError as exc:
        return Slot(name, None, None, str(exc), None)
    mark: HighWater | None = None
    try:
        only = msgspec.json.decode(raw, type=_MarkOnly)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    else:
        mark = None if only.high_water is None else HighWater(only.high_water.version, only.high_water.bundle)
    try:
        meta = msgspec.json.decode(raw, type=Generation)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return Slot(name, None, None, f"{path}: corrupt: {exc}", mark)
    try:
        lkg = _load_generation(state_dir, path, meta)
    except LastKnownGoodError as exc:
        return Slot(name, meta, None, str(exc), mark)
    return Slot(name, meta, lkg, None, mark)


def _read_capped(path: Path) -> bytes:
    with open(path, "rb") as file:
        raw = file.read(_MAX_GENERATION_BYTES + 1)
    if len(raw) > _MAX_GENERATION_BYTES:
        raise LastKnownGoodError(f"{path}: corrupt: over {_MAX_GENERATION_BYTES} bytes")
    return raw


def _load_generation(state_dir: Path, path: Path, meta: Generation) -> LastKnownGood:
    if not is_digest(meta.digest):
        raise LastKnownGoodError(f"{path}: corrupt: digest {meta.digest!r} is not sha256:<hex>")
    bundle_path = state_dir / BUNDLES / bundle_name(meta.digest)
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
            check_release(_unverified_release(envelope), meta.digest, meta.release_version)
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
    from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, Envelope
    from starmesh.bundle.release import decode_release

    parsed = msgspec.json.decode(envelope, type=Envelope)
    if parsed.payload_type != RELEASE_PAYLOAD_TYPE:
        raise BundleError(f"payloadType is {parsed.payload_type!r}, expected {RELEASE_PAYLOAD_TYPE!r}")
    return decode_release(base64.b64decode(parsed.payload, validate=True))


def check_release(release: Release, digest: str, version: int | None) -> None:
    """BundleError unless `release` is release `version` of bundle `digest` (what the generation says)."""
    if (release.bundle, release.version) != (digest, version):
        raise BundleError(
            f"it is release {release.version} of bundle {release.bundle}, "
            f"but the generation says release {version} of bundle {digest}"
        )
