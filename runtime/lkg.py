"""Last-known-good: the applied config on disk, so a restarted proxy starts from it.

DESIGN.md: "a restarted proxy starts from last-known-good on disk (written atomically:
temp file, fsync, rename)" and "the last endpoint table is persisted with
last-known-good". Layout in `--state-dir`:

    STATE_DIR/
      last-known-good.json          {"digest", "release_version", "applied_at", "origin",
                                     "endpoints", "endpoints_version"}
      bundles/sha256-<hex>.json     the bundle's canonical bytes, named by digest

The bundle is written first and named by its digest, then the small JSON that points
at it is renamed into place: a crash at any moment leaves the old pair or the new
pair, never a pointer to half a bundle. Files are written to a temp file in the same
directory, fsynced, renamed, and the directory fsynced. Loading verifies the bundle's
digest again; anything that does not verify raises LastKnownGoodError and is never
applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from starmesh.bundle.canonical import digest_of, is_digest
from starmesh.bundle.files import TEMP_PREFIX, write_atomically
from starmesh.runtime.endpoints import EndpointTable, parse_endpoints
from starmesh.runtime.errors import EndpointsError, LastKnownGoodError

__all__ = ["LKG_FILE", "LastKnownGood", "Origin", "load_last_known_good", "save_last_known_good"]

Origin = Literal["control-plane", "last-known-good", "file"]
LKG_FILE = "last-known-good.json"
_BUNDLES = "bundles"


class _Meta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    digest: str
    release_version: int | None
    applied_at: str
    origin: Origin
    endpoints: dict[str, dict[str, list[str]]] = {}
    endpoints_version: int = 0


@dataclass(frozen=True, slots=True)
class LastKnownGood:
    """A config as persisted: bundle bytes (digest verified), how it was applied, the endpoints."""

    data: bytes
    digest: str
    release_version: int | None
    applied_at: str
    origin: Origin
    endpoints: EndpointTable
    endpoints_version: int


def _bundle_name(digest: str) -> str:
    return digest.replace(":", "-") + ".json"


def save_last_known_good(state_dir: Path, lkg: LastKnownGood) -> None:
    """Persist `lkg` atomically and drop older bundles and stray temp files. Raises OSError."""
    bundles = state_dir / _BUNDLES
    bundles.mkdir(parents=True, exist_ok=True)
    keep = _bundle_name(lkg.digest)
    target = bundles / keep
    if not target.is_file() or digest_of(target.read_bytes()) != lkg.digest:
        write_atomically(target, lkg.data)
    meta = _Meta(
        digest=lkg.digest,
        release_version=lkg.release_version,
        applied_at=lkg.applied_at,
        origin=lkg.origin,
        endpoints={s: {v: list(a) for v, a in versions.items()} for s, versions in lkg.endpoints.items()},
        endpoints_version=lkg.endpoints_version,
    )
    write_atomically(state_dir / LKG_FILE, msgspec.json.encode(meta))
    for directory in (bundles, state_dir):
        for entry in directory.iterdir():
            stale = entry.name.startswith(TEMP_PREFIX) or (directory is bundles and entry.name != keep)
            if stale and entry.is_file():
                entry.unlink(missing_ok=True)


def load_last_known_good(state_dir: Path) -> LastKnownGood | None:
    """The persisted config, None when there is none; LastKnownGoodError when it is corrupt."""
    meta_path = state_dir / LKG_FILE
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LastKnownGoodError(f"{meta_path}: cannot read: {exc.strerror or exc}") from exc
    try:
        meta = msgspec.json.decode(raw, type=_Meta)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise LastKnownGoodError(f"{meta_path}: corrupt: {exc}") from exc
    if not is_digest(meta.digest):
        raise LastKnownGoodError(f"{meta_path}: corrupt: digest {meta.digest!r} is not sha256:<hex>")
    bundle_path = state_dir / _BUNDLES / _bundle_name(meta.digest)
    try:
        data = bundle_path.read_bytes()
    except OSError as exc:
        raise LastKnownGoodError(f"{bundle_path}: the bundle {meta.digest} it names cannot be read: {exc.strerror or exc}") from exc
    actual = digest_of(data)
    if actual != meta.digest:
        raise LastKnownGoodError(f"{bundle_path}: corrupt: its bytes hash to {actual}, not {meta.digest}")
    try:
        endpoints = parse_endpoints(msgspec.json.encode(meta.endpoints), f"{meta_path}: endpoints")
    except EndpointsError as exc:
        raise LastKnownGoodError(str(exc)) from exc
    return LastKnownGood(
        data=data,
        digest=meta.digest,
        release_version=meta.release_version,
        applied_at=meta.applied_at,
        origin=meta.origin,
        endpoints=endpoints,
        endpoints_version=meta.endpoints_version,
    )
