"""EtcdStore's copy of everything under the key prefix, and the watch that keeps it current.

    full read (revision R) ──► Mirror.load ◄── own writes (revision from the txn answer)
    watch from R+1 ─────────► Mirror.apply ──► subscribers (one dispatcher thread, in order)

Every entry remembers the revision that wrote it, and every deletion leaves a tombstone
at the revision that deleted it, so an event is applied only when it is newer than what
the mirror holds for that key: the echo of an own write changes nothing, and an old PUT
arriving after a delete cannot bring the key back. Tombstones older than what the watch
has delivered can no longer matter and are dropped.

Subscribers are called on the mirror's dispatcher thread, never under its lock, once per
change and in the order the changes were applied (per key, that is revision order).
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from etcd3gw.client import Etcd3Client
from etcd3gw.types import Event
from etcd3gw.watch import Watcher

from starmesh.reconciler.etcd_client import EtcdConnection

__all__ = [
    "KeyMeta",
    "Listener",
    "Mirror",
    "MirrorFeed",
    "PrefixWatch",
    "b64",
    "decode_kv",
    "prefix_end",
    "read_prefix",
]

log = logging.getLogger("starmesh.control_plane.store")

Listener = Callable[[str, "bytes | None"], None]
"""A subscriber: the store key that changed and its new value (None: deleted)."""

_MAX_TOMBSTONES = 1024
"""Past this many, tombstones the watch has gone past are dropped."""


@dataclass(frozen=True)
class KeyMeta:
    """One key as the mirror holds it: the value and etcd's bookkeeping for it."""

    value: bytes
    create_revision: int  # the fence of the leader key is this
    mod_revision: int
    lease: int = 0  # 0: no lease


def b64(data: str | bytes) -> str:
    """Keys and values travel base64-encoded in etcd's JSON API."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (its last byte plus one)."""
    raw = bytearray(prefix.encode("utf-8"))
    raw[-1] += 1
    return raw.decode("utf-8")


def decode_kv(kv: Mapping[str, Any]) -> tuple[bytes, KeyMeta]:
    """A KeyValue from a JSON answer (base64 fields, int64 as strings): its raw key and meta."""
    return base64.b64decode(kv["key"]), KeyMeta(
        value=base64.b64decode(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
        lease=int(kv.get("lease", 0)),
    )


def read_prefix(client: Etcd3Client, prefix: str) -> tuple[dict[str, KeyMeta], int]:
    """Every key under `prefix` (store keys, prefix removed) and the revision of the read."""
    answer = client.post(client.get_url("/kv/range"), json={"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
    found: dict[str, KeyMeta] = {}
    for kv in answer.get("kvs", []):
        raw, meta = decode_kv(kv)
        found[raw.decode("utf-8")[len(prefix) :]] = meta
    return found, int(answer["header"]["revision"])


class PrefixWatch:
    """One etcd3gw watch on every key under `prefix`, from `start_revision`, on its own session.

    `client` is the watch's own (EtcdConnection.clone: the member in use, with its TLS
    settings): stopping the watch closes its connection pool, not the store's. etcd3gw runs
    the stream on a thread of its own and cannot say when it breaks (EtcdStore probes for
    that). `stop()` closes the stream and waits for that thread.
    """

    def __init__(
        self, client: Etcd3Client, prefix: str, start_revision: int, on_event: Callable[[Event], None]
    ) -> None:
        self._client = client
        try:
            self._watcher = Watcher(
                self._client, prefix, on_event, start_revision=start_revision, range_end=prefix_end(prefix)
            )
        except BaseException:
            self._client.session.close()
            raise

    def stop(self) -> None:
        self._watcher.stop()
        self._watcher._executor.shutdown(wait=True)  # the stream thread has returned
        self._watcher._response.close()
        self._client.session.close()


class Mirror:
    """Keys → KeyMeta, with tombstones, the revision caught up with, and subscribers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, KeyMeta] = {}
        self._folders: dict[str, set[str]] = {}  # "releases/" → {"releases/000000000007", ...}
        self._tombstones: dict[str, int] = {}
        self._revision = 0
        self._listeners: list[tuple[str, Listener]] = []
        self._queue: queue.SimpleQueue[tuple[Listener, str, bytes | None] | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None

    # -- reads ---------------------------------------------------------------------

    def get(self, key: str) -> KeyMeta | None:
        with self._lock:
            return self._entries.get(key)

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(self._folders.get(prefix, ()))

    @property
    def revision(self) -> int:
        """The newest revision the mirror has applied (read, watched or written)."""
        with self._lock:
            return self._revision

    # -- changes -------------------------------------------------------------------

    def apply(self, key: str, meta: KeyMeta | None, revision: int, *, watched: bool = False) -> None:
        """Set (meta) or delete (None) `key` as of `revision`, unless the mirror holds newer."""
        with self._lock:
            self._revision = max(self._revision, revision)
            current = self._entries.get(key)
            known = max(current.mod_revision if current else 0, self._tombstones.get(key, 0))
            if revision > known:
                self._set(key, meta, revision)
            if watched and len(self._tombstones) > _MAX_TOMBSTONES:
                self._tombstones = {k: r for k, r in self._tombstones.items() if r > revision}

    def load(self, snapshot: Mapping[str, KeyMeta], revision: int) -> None:
        """Replace the mirror with a full read at `revision`; own writes newer than it stay.

        Subscribers hear of every key whose value changed or vanished."""
        with self._lock:
            self._revision = max(self._revision, revision)
            for key, meta in snapshot.items():
                current = self._entries.get(key)
                if max(current.mod_revision if current else 0, self._tombstones.get(key, 0)) < meta.mod_revision:
                    self._set(key, meta, meta.mod_revision)
            for key, current in list(self._entries.items()):
                if key not in snapshot and current.mod_revision <= revision:
                    self._set(key, None, revision)
            self._tombstones = {k: r for k, r in self._tombstones.items() if r > revision}

    def drop_lease(self, lease: int, revision: int) -> None:
        """The lease was revoked at `revision`: its keys are gone."""
        with self._lock:
            self._revision = max(self._revision, revision)
            for key, meta in list(self._entries.items()):
                if meta.lease == lease and meta.mod_revision < revision:
                    self._set(key, None, revision)

    def _set(self, key: str, meta: KeyMeta | None, revision: int) -> None:
        folder = key[: key.rfind("/") + 1]
        current = self._entries.get(key)
        if meta is None:
            if current is None:
                self._tombstones[key] = revision
                return
            del self._entries[key]
            self._tombstones[key] = revision
            names = self._folders.get(folder)
            if names is not None:
                names.discard(key)
                if not names:
                    del self._folders[folder]
        else:
            self._entries[key] = meta
            self._tombstones.pop(key, None)
            self._folders.setdefault(folder, set()).add(key)
        value = None if meta is None else meta.value
        for prefix, listener in self._listeners:
            if key.startswith(prefix):
                self._queue.put((listener, key, value))

    # -- subscribers ---------------------------------------------------------------

    def subscribe(self, prefix: str, listener: Listener) -> None:
        with self._lock:
            self._listeners.append((prefix, listener))

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="etcd-store-subscribers", daemon=True)
            self._dispatcher.start()

    def close(self) -> None:
        if self._dispatcher is not None:
            self._queue.put(None)
            self._dispatcher.join()
            self._dispatcher = None

    def _dispatch(self) -> None:
        while (item := self._queue.get()) is not None:
            listener, key, value = item
            try:
                listener(key, value)
            except Exception:  # one subscriber's bug must not stop the others
                log.exception("store subscriber failed on %s", key)


class MirrorFeed:
    """Keeps a Mirror current: a full read of the prefix, then one watch from the read's revision.

    `resync()` reads again and replaces the watch (at start, after etcd was away, when the
    watch went quiet); events of a replaced watch are dropped. Keys under `hidden` (the
    stores' probes) never enter the mirror, but their events count as progress:
    `wait_for(revision)` is how the probe learns the watch is alive.
    """

    def __init__(self, connection: EtcdConnection, mirror: Mirror, *, hidden: str) -> None:
        self._connection = connection
        self._mirror = mirror
        self._prefix = connection.url.prefix
        self._hidden = hidden
        self._lock = threading.Lock()  # one resync (or stop) at a time
        self._progress = threading.Condition()
        self._generation = 0
        self._watched = 0
        self._watch: PrefixWatch | None = None

    @property
    def watched(self) -> int:
        """The newest revision the current watch (or the last full read) has delivered."""
        with self._progress:
            return self._watched

    def wait_for(self, revision: int, timeout: float) -> bool:
        with self._progress:
            return self._progress.wait_for(lambda: self._watched >= revision, timeout)

    def resync(self) -> None:
        """Read the prefix, load it into the mirror and watch from there (StoreError: etcd did not answer)."""
        with self._lock:
            what = f"read {self._prefix}"
            snapshot, revision = self._connection.call(lambda c: read_prefix(c, self._prefix), what)
            self._stop_watch()
            with self._progress:
                self._generation += 1
                generation = self._generation
                self._mirror.load({k: m for k, m in snapshot.items() if not k.startswith(self._hidden)}, revision)
                self._watched = revision

            def on_event(event: Event) -> None:
                try:
                    self._apply(generation, event)
                except Exception:  # raising here would end etcd3gw's stream thread without a word
                    log.exception("etcd store: cannot apply a watch event")

            self._watch = self._connection.call(
                lambda c: PrefixWatch(self._connection.clone(c), self._prefix, revision + 1, on_event),
                f"watch {self._prefix}",
            )

    def stop(self) -> None:
        with self._lock:
            self._stop_watch()

    def _stop_watch(self) -> None:
        with self._progress:
            self._generation += 1
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()

    def _apply(self, generation: int, event: Event) -> None:
        kv = event["kv"]  # etcd3gw has decoded key and value already
        key = kv["key"].decode("utf-8")[len(self._prefix) :]
        revision = int(kv["mod_revision"])
        with self._progress:
            if generation != self._generation:
                return
            if not key.startswith(self._hidden):
                meta = None
                if event.get("type") != "DELETE":
                    created, lease = int(kv.get("create_revision", 0)), int(kv.get("lease", 0))
                    meta = KeyMeta(kv.get("value", b""), created, revision, lease)
                self._mirror.apply(key, meta, revision, watched=True)
            self._watched = max(self._watched, revision)
            self._progress.notify_all()
