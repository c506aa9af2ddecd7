"""The control plane's durable state, as a small key-value store.

Keys are `/`-separated names (`bundles/sha256-…`, `releases/000000000007`,
`status/last-compile`); values are bytes. `FileStore` keeps one file per key under
`--state-dir`, each written atomically (temp file, fsync, rename, directory fsync), so a
control plane killed at any moment restarts from a consistent state. The high
availability issue adds an etcd store with the same interface (`compare_and_put` is
what several replicas need to allocate release versions without a lock).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from starmesh.bundle.files import TEMP_PREFIX, write_atomically
from starmesh.reconciler.errors import StoreError

__all__ = ["FileStore", "Store", "StoreHealth"]

_KEY = re.compile(r"^[a-z0-9][a-z0-9._:-]*(/[a-z0-9][a-z0-9._:-]*)*$")


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store takes writes now (`/v1/status` shows it under `control_plane.store`).

    An etcd store that cannot reach etcd stays readable from its mirror: `read_only`, with
    `since` (ISO-8601, UTC) the moment it was first found unreachable and `error` why.
    """

    kind: Literal["file", "etcd"]
    available: bool
    since: str | None = None
    error: str | None = None
    member: str | None = None  # the etcd member in use, HOST:PORT
    revision: int | None = None  # the etcd revision the mirror has caught up with

    @property
    def read_only(self) -> bool:
        return not self.available

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "available": self.available,
            "read_only": self.read_only,
            "since": self.since,
            "error": self.error,
            "member": self.member,
            "revision": self.revision,
        }


class Store(Protocol):
    """Durable bytes by key. Every method raises StoreError when the store cannot be used."""

    def get(self, key: str) -> bytes | None:
        """The value, or None when the key was never written (or was deleted)."""

    def put(self, key: str, value: bytes) -> None:
        """Write `value` durably; readers see the old value or the new one."""

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes) -> bool:
        """Write only if the current value is `expected` (None: absent); False when it was not."""

    def delete(self, key: str) -> None:
        """Remove the key; no error when it is absent."""

    def keys(self, prefix: str) -> list[str]:
        """Keys directly under `prefix` (a `/`-ended folder name), sorted."""

    def health(self) -> StoreHealth:
        """Whether writes can succeed now; never raises."""


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or len(key) > 512:
        raise StoreError(f"invalid store key {key!r} (lower-case names, digits, ._:- and /)")
    return key


class FileStore:
    """One file per key under `root` (the control plane's `--state-dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()  # compare_and_put from worker threads
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state dir {root}: {exc.strerror or exc}") from exc

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, value, mode=0o600)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def compare_and_put(self, key: str, expected: bytes | None, value: bytes) -> bool:
        with self._lock:
            if self.get(key) != expected:
                return False
            self.put(key, value)
            return True

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def keys(self, prefix: str) -> list[str]:
        folder = prefix.rstrip("/")
        directory = self._path(folder) if folder else self.root
        try:
            names = sorted(
                entry.name for entry in directory.iterdir() if entry.is_file() and not entry.name.startswith(TEMP_PREFIX)
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {directory}: {exc.strerror or exc}") from exc
        return [f"{folder}/{name}" if folder else name for name in names]

    def health(self) -> StoreHealth:
        """A state dir is always there to write to (a failing disk shows as StoreError)."""
        return StoreHealth(kind="file", available=True)
