"""The control plane's records on a Store: bundles, releases, versions, compile status.

    bundles/sha256-<hex>          bundle bytes, immutable, stored by digest
    releases/<version, 12 digits> one ReleaseRecord (JSON, the envelope inside), the newest
                                  RELEASE_HISTORY kept (and every one a rollout still needs)
    versions/high-water           the highest release version ever allocated
    status/last-compile           CompileStatus of the last commit compiled
    status/last-commit            the commit last reconciled (an unchanged tip is no work)
    rollout/state                 the rollout's own JSON (rollout.py)

Versions are allocated by `next_version`, which persists the new high-water mark
before returning it: a restart (or a crash between allocation and signing) never
reuses or lowers a version, at worst it skips one.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import msgspec

from starmesh.bundle.canonical import digest_of, is_digest
from starmesh.reconciler.errors import StoreError, UnknownBundle
from starmesh.reconciler.model import CompileStatus, ReleaseReason, ReleaseRecord
from starmesh.reconciler.store import Store

__all__ = ["RELEASE_HISTORY", "Ledger"]

RELEASE_HISTORY = 100
"""Release records kept; older ones are pruned (their bundles stay: rollback targets)."""

_HIGH_WATER = "versions/high-water"
_LAST_COMPILE = "status/last-compile"
_LAST_COMMIT = "status/last-commit"
_ROLLOUT = "rollout/state"


class _StoredRelease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    bundle: str
    previous: str | None
    commit: str | None
    issued_at: str
    expires_at: str
    reason: ReleaseReason
    envelope: str  # base64 of the envelope bytes


class _StoredCompile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    commit: str | None
    ok: bool
    digest: str | None
    at: str
    diagnostics: list[dict[str, object]]


def _bundle_key(digest: str) -> str:
    if not is_digest(digest):
        raise UnknownBundle(f"{digest!r} is not a bundle digest (sha256:<64 lowercase hex>)")
    return "bundles/" + digest.replace(":", "-")


def _release_key(version: int) -> str:
    return f"releases/{version:012d}"


class Ledger:
    """Typed access to the control plane's durable records."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._keep: tuple[int, ...] = ()  # versions a rollout still serves (keep_releases)

    # -- bundles -------------------------------------------------------------------

    def put_bundle(self, data: bytes) -> str:
        """Store bundle bytes under their digest (idempotent); returns the digest."""
        digest = digest_of(data)
        key = _bundle_key(digest)
        if self.store.get(key) is None:
            self.store.put(key, data)
        return digest

    def bundle(self, digest: str) -> bytes:
        """The bundle bytes for `digest`; UnknownBundle when never stored (or corrupt on disk)."""
        data = self.store.get(_bundle_key(digest))
        if data is None:
            raise UnknownBundle(f"no bundle {digest} in the control plane's store")
        if digest_of(data) != digest:
            raise UnknownBundle(f"the stored bundle {digest} does not match its digest (corrupt state dir)")
        return data

    def has_bundle(self, digest: str) -> bool:
        try:
            return self.store.get(_bundle_key(digest)) is not None
        except UnknownBundle:
            return False

    # -- versions and releases -----------------------------------------------------

    def high_water(self) -> int:
        """The highest version ever allocated (0 before the first)."""
        raw = self.store.get(_HIGH_WATER)
        if raw is None:
            return 0
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{_HIGH_WATER} holds {raw[:40]!r}, not a version number") from exc

    def next_version(self) -> int:
        """Allocate a version above every earlier one, persisted before it is returned.

        Never below the newest stored release either (a high-water file lost with the
        releases kept must not lower versions)."""
        while True:
            raw = self.store.get(_HIGH_WATER)
            current = self.high_water()
            newest = self.current()
            floor = max(current, newest.version if newest is not None else 0)
            version = floor + 1
            if self.store.compare_and_put(_HIGH_WATER, raw, str(version).encode("ascii")):
                return version

    def record_release(self, record: ReleaseRecord) -> None:
        """Persist an issued release; it becomes `current()` if it is the newest."""
        stored = _StoredRelease(
            record.version,
            record.bundle,
            record.previous,
            record.commit,
            record.issued_at,
            record.expires_at,
            record.reason,
            base64.b64encode(record.envelope).decode("ascii"),
        )
        self.store.put(_release_key(record.version), msgspec.json.encode(stored))
        self._prune()

    def release(self, version: int) -> ReleaseRecord | None:
        """One stored release, or None when never issued (or pruned)."""
        raw = self.store.get(_release_key(version))
        return None if raw is None else _decode_release(raw, _release_key(version))

    def current(self) -> ReleaseRecord | None:
        """The newest release issued, or None before the first."""
        keys = self.store.keys("releases/")
        if not keys:
            return None
        raw = self.store.get(keys[-1])
        return None if raw is None else _decode_release(raw, keys[-1])

    def releases(self) -> list[ReleaseRecord]:
        """Every stored release, oldest first."""
        out = []
        for key in self.store.keys("releases/"):
            raw = self.store.get(key)
            if raw is not None:
                out.append(_decode_release(raw, key))
        return out

    def keep_releases(self, versions: Iterable[int]) -> None:
        """Never prune `versions` (the releases a rollout still serves), from now on."""
        self._keep = tuple(versions)
        self._prune()

    def _prune(self) -> None:
        keys = self.store.keys("releases/")
        protected = {_release_key(v) for v in self._keep}
        for key in keys[: max(0, len(keys) - RELEASE_HISTORY)]:
            if key not in protected:
                self.store.delete(key)

    # -- compile status and progress ------------------------------------------------

    def last_compile(self) -> CompileStatus | None:
        raw = self.store.get(_LAST_COMPILE)
        if raw is None:
            return None
        try:
            s = msgspec.json.decode(raw, type=_StoredCompile)
        except msgspec.MsgspecError as exc:
            raise StoreError(f"{_LAST_COMPILE} is corrupt: {exc}") from exc
        return CompileStatus(s.commit, s.ok, s.digest, s.at, tuple(s.diagnostics))

    def set_last_compile(self, status: CompileStatus) -> None:
        stored = _StoredCompile(status.commit, status.ok, status.digest, status.at, list(status.diagnostics))
        self.store.put(_LAST_COMPILE, msgspec.json.encode(stored))

    def last_commit(self) -> str | None:
        raw = self.store.get(_LAST_COMMIT)
        return None if raw is None else raw.decode("ascii", "replace").strip() or None

    def set_last_commit(self, commit: str) -> None:
        self.store.put(_LAST_COMMIT, commit.encode("ascii"))

    def rollout_state(self) -> bytes | None:
        return self.store.get(_ROLLOUT)

    def set_rollout_state(self, data: bytes) -> None:
        self.store.put(_ROLLOUT, data)


def _decode_release(raw: bytes, key: str) -> ReleaseRecord:
    try:
        s = msgspec.json.decode(raw, type=_StoredRelease)
        envelope = base64.b64decode(s.envelope, validate=True)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise StoreError(f"{key} is corrupt: {exc}") from exc
    return ReleaseRecord(s.version, s.bundle, s.previous, s.commit, s.issued_at, s.expires_at, s.reason, envelope)
