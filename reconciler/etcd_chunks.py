"""Values larger than one etcd request, stored as parts behind a small pointer.

etcd refuses a request larger than its `--max-request-bytes` (1.5 MiB by default), and a
big mesh's bundle can pass 1 MiB. EtcdStore therefore writes a value longer than its
chunk size (512 KiB by default) like this:

    chunks/<key>/~<tag>/0 … /<n-1>   the parts, each in a txn of its own (fenced when the
                                     write is), written first
    <key>                            POINTER_MAGIC + {"chunks": n, "sha256", "size"}, in one
                                     txn that also deletes the key's other part sets

`<tag>` is the start of the value's sha256, so a set of parts never changes once written:
a reader holding the old pointer while a new value is being written still finds the old
parts, and two writers of the same value write the same bytes. The `~` keeps the parts of
`a` apart from those of `a/b` (a store key cannot hold `~`).

The watch delivers the parts before the pointer (revision order), so a mirror that holds
a pointer holds its parts; `ChunkedValues.decode` puts them together and checks the size
and the sha256. A part that is missing or altered is a StoreError naming the key.
Subscribers (`ChunkedValues.listener`) hear of the key once, with the whole value, and
never of its parts.

Stored values are framed so that no ordinary value can pass for a pointer: a value that
starts with a NUL byte (as POINTER_MAGIC does) is stored behind ESCAPE_MAGIC, which
`decode` removes. Values written before this framing existed are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starmesh.reconciler.errors import StoreError
from starmesh.reconciler.etcd_mirror import KeyMeta, Listener, b64, prefix_end

__all__ = [
    "CHUNKS_PREFIX",
    "DEFAULT_CHUNK_SIZE",
    "ESCAPE_MAGIC",
    "POINTER_MAGIC",
    "ChunkedValues",
    "Pointer",
    "encode_value",
    "other_part_ranges",
    "part_key",
    "split",
]

DEFAULT_CHUNK_SIZE = 512 * 1024
"""Bytes per part: a third of etcd's default request limit, leaving room for the txn around it."""
CHUNKS_PREFIX = "chunks/"
"""Where the parts live; reserved (no store key may start with it)."""
POINTER_MAGIC = b"\x00starmesh:chunked\n"
ESCAPE_MAGIC = b"\x00starmesh:value\n"
_TAG_LENGTH = 16
log = logging.getLogger("starmesh.control_plane.store")

_CACHE_ENTRIES = 8
"""Assembled values kept, so a bundle fetched by many proxies is put together once."""


@dataclass(frozen=True)
class Pointer:
    """What a chunked key holds: how many parts, and the whole value's size and sha256."""

    chunks: int
    size: int
    sha256: str

    @property
    def tag(self) -> str:
        return self.sha256[:_TAG_LENGTH]

    def encode(self) -> bytes:
        body = {"chunks": self.chunks, "sha256": self.sha256, "size": self.size}
        return POINTER_MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")

    def part_keys(self, key: str) -> list[str]:
        return [part_key(key, self.tag, n) for n in range(self.chunks)]

    @staticmethod
    def read(key: str, raw: bytes) -> Pointer | None:
        """The pointer `raw` holds; None when it holds a value; StoreError when it is damaged."""
        if not raw.startswith(POINTER_MAGIC):
            return None
        try:
            body = json.loads(raw[len(POINTER_MAGIC) :])
            pointer = Pointer(int(body["chunks"]), int(body["size"]), str(body["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store key {key}: its chunk pointer is damaged ({exc})") from None
        if pointer.chunks < 1 or pointer.size < 0 or len(pointer.sha256) != 64:
            raise StoreError(f"store key {key}: its chunk pointer is damaged ({raw[len(POINTER_MAGIC):][:120]!r})")
        return pointer


def part_key(key: str, tag: str, number: int) -> str:
    return f"{CHUNKS_PREFIX}{key}/~{tag}/{number}"


def encode_value(value: bytes) -> bytes:
    """What the key holds for a value stored whole: itself, or escaped when it starts with NUL."""
    return ESCAPE_MAGIC + value if value.startswith(b"\x00") else value


def split(key: str, value: bytes, chunk_size: int) -> tuple[Pointer, list[tuple[str, bytes]]]:
    """The pointer for `value` and its parts (part key, bytes), in order."""
    count = max(1, -(-len(value) // chunk_size))
    pointer = Pointer(count, len(value), hashlib.sha256(value).hexdigest())
    parts = [(part_key(key, pointer.tag, n), value[n * chunk_size : (n + 1) * chunk_size]) for n in range(count)]
    return pointer, parts


def other_part_ranges(key: str, keep: str | None) -> list[tuple[str, str]]:
    """Key ranges [start, end) covering the parts of `key` except the set tagged `keep`."""
    folder = f"{CHUNKS_PREFIX}{key}/~"
    if keep is None:
        return [(folder, prefix_end(folder))]
    kept = f"{folder}{keep}/"
    return [(folder, kept), (prefix_end(kept), prefix_end(folder))]


class ChunkedValues:
    """Values to stored bytes and back, for one store: `read` is its mirror's lookup."""

    def __init__(self, read: Callable[[str], KeyMeta | None], chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self.chunk_size = chunk_size
        self._read = read
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # key → (mod_revision, value)

    def decode(self, key: str, meta: KeyMeta) -> bytes:
        raw = meta.value
        if not raw.startswith(b"\x00"):
            return raw
        if raw.startswith(ESCAPE_MAGIC):
            return raw[len(ESCAPE_MAGIC) :]
        pointer = Pointer.read(key, raw)
        if pointer is None:
            return raw  # written before values were framed
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] == meta.mod_revision:
                self._cache.move_to_end(key)
                return cached[1]
        value = self._assemble(key, pointer)
        with self._lock:
            self._cache[key] = (meta.mod_revision, value)
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    def has_parts(self, key: str) -> bool:
        """Whether the mirror holds a pointer (even a damaged one) at `key`."""
        meta = self._read(key)
        return meta is not None and meta.value.startswith(POINTER_MAGIC)

    def stored(self, key: str, value: bytes) -> bytes:
        """What `key` holds in etcd when its value is `value` (compare_and_put compares it):
        the mirror's bytes when they decode to `value`, else what this store would write."""
        meta = self._read(key)
        if meta is not None:
            try:
                if self.decode(key, meta) == value:
                    return meta.value
            except StoreError:
                pass
        return split(key, value, self.chunk_size)[0].encode() if len(value) > self.chunk_size else encode_value(value)

    def delete_ops(self, prefix: str, key: str, keep: str | None) -> list[dict[str, Any]]:
        """Txn operations deleting the parts of `key` (under etcd `prefix`) but the set `keep`."""
        return [
            {"request_delete_range": {"key": b64(prefix + start), "range_end": b64(prefix + end)}}
            for start, end in other_part_ranges(key, keep)
        ]

    def listener(self, callback: Listener) -> Listener:
        """`callback` as a mirror listener: parts skipped, values decoded (a value whose parts
        are gone by then is skipped and logged: a newer value of the key follows)."""

        def deliver(key: str, raw: bytes | None) -> None:
            if key.startswith(CHUNKS_PREFIX):
                return
            try:
                value = None if raw is None else self.decode(key, KeyMeta(raw, 0, 0))
            except StoreError as exc:
                log.warning("store change of %s not delivered: %s", key, exc)
                return
            callback(key, value)

        return deliver

    def _assemble(self, key: str, pointer: Pointer) -> bytes:
        parts: list[bytes] = []
        for number, name in enumerate(pointer.part_keys(key)):
            part = self._read(name)
            if part is None:
                raise StoreError(
                    f"store key {key}: part {number + 1} of {pointer.chunks} ({name}) is missing; "
                    "write the value again"
                )
            parts.append(part.value)
        value = b"".join(parts)
        if len(value) != pointer.size or hashlib.sha256(value).hexdigest() != pointer.sha256:
            raise StoreError(
                f"store key {key}: its {pointer.chunks} parts do not add up to the value written "
                f"(size {len(value)}, expected {pointer.size} with sha256 {pointer.sha256[:12]}…); "
                "a part was altered: write the value again"
            )
        return value
