"""etcd_store.py: the mirror, the watch, fenced writes, leases, and life without etcd (real etcd).

Waits are bounded polls (`until`), never sleeps standing in for assertions.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from starmesh.reconciler.errors import NotLeader, StoreError, StoreUnavailable
from starmesh.reconciler.etcd_chunks import DEFAULT_CHUNK_SIZE
from starmesh.reconciler.etcd_client import EtcdConnection, parse_etcd_url
from starmesh.reconciler.etcd_mirror import KeyMeta, Mirror, read_prefix
from starmesh.reconciler.etcd_store import EtcdStore

DEADLINE = 30.0
"""Seconds a wait may take: a bound on waiting, never an assertion about speed."""

Opener = Callable[..., EtcdStore]


def until(test: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not test():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Recorder:
    """A subscriber that keeps what it was told, in order (called on the store's thread)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes | None]] = []
        self._lock = threading.Lock()

    def __call__(self, key: str, value: bytes | None) -> None:
        with self._lock:
            self.seen.append((key, value))

    def __len__(self) -> int:
        with self._lock:
            return len(self.seen)


def test_a_second_store_sees_writes_through_its_watch_once_each_in_order(open_store: Opener) -> None:
    writer, reader = open_store(), open_store()
    own, other = Recorder(), Recorder()
    writer.subscribe("x/", own)
    reader.subscribe("x/", other)
    writer.put("elsewhere", b"not under x/")
    expected: list[tuple[str, bytes | None]] = []
    for n in range(20):
        writer.put("x/counter", str(n).encode())
        expected.append(("x/counter", str(n).encode()))
    assert writer.compare_and_put("x/new", None, b"n")
    writer.delete("x/counter")
    writer.put_many({"x/a": b"1", "x/new": None})
    expected += [("x/new", b"n"), ("x/counter", None), ("x/a", b"1"), ("x/new", None)]

    assert reader.wait_synced(DEADLINE) and writer.wait_synced(DEADLINE)
    until(lambda: len(other) >= len(expected) and len(own) >= len(expected), "the subscribers to hear everything")
    assert other.seen == expected
    assert own.seen == expected  # own writes once: the watch's echo changes nothing
    assert reader.keys("x/") == ["x/a"] and reader.get("x/a") == b"1" and reader.get("x/counter") is None
    assert reader.get("elsewhere") == b"not under x/"


def test_meta_carries_revisions_and_the_lease(open_store: Opener) -> None:
    store, other = open_store(), open_store()
    store.put("x/k", b"1")
    first = store.meta("x/k")
    store.put("x/k", b"2")
    second = store.meta("x/k")
    assert first is not None and second is not None
    assert second.create_revision == first.create_revision < second.mod_revision
    lease = store.grant_lease(30)
    store.put_leased("x/leased", b"v", lease)
    assert other.wait_synced(DEADLINE)
    assert other.meta("x/k") == second
    leased = other.meta("x/leased")
    assert leased is not None and leased.lease == lease and leased.value == b"v"
    assert store.health().revision is not None and store.health().revision >= leased.mod_revision


def test_fenced_writes_need_the_leader_key_this_replica_created(open_store: Opener) -> None:
    store, other = open_store(), open_store()
    lease = store.grant_lease(30)
    fence = store.create_leased("leader", b'{"id": "r1"}', lease)
    assert fence is not None and store.meta("leader") == KeyMeta(b'{"id": "r1"}', fence, fence, lease)
    assert other.create_leased("leader", b'{"id": "r2"}', other.grant_lease(30)) is None
    assert other.get("leader") == b'{"id": "r1"}'  # the refused create read the holder back

    held: list[int | None] = [fence]
    fenced = store.fenced(lambda: held[0])
    fenced.put("releases/000000000001", b"one")
    assert fenced.compare_and_put("versions/high-water", None, b"1") is True
    assert fenced.compare_and_put("versions/high-water", b"0", b"2") is False  # a CAS miss, not NotLeader
    fenced.delete("releases/000000000001")
    assert fenced.get("versions/high-water") == b"1" and fenced.keys("releases/") == []

    held[0] = None  # the election says this replica does not lead
    with pytest.raises(NotLeader, match="no longer the leader"):
        fenced.put("releases/000000000002", b"two")

    held[0] = fence
    store.delete("leader")  # deposed: another replica takes the key
    assert other.create_leased("leader", b'{"id": "r2"}', other.grant_lease(30)) is not None
    for write in (
        lambda: fenced.put("releases/000000000002", b"two"),
        lambda: fenced.compare_and_put("versions/high-water", b"1", b"2"),
        lambda: fenced.delete("versions/high-water"),
    ):
        with pytest.raises(NotLeader, match="no longer the leader"):
            write()
    assert other.wait_synced(DEADLINE)
    for seen in (store, other):
        assert seen.get("releases/000000000002") is None and seen.get("versions/high-water") == b"1"


def test_compare_and_put_races_allocate_every_version_once(open_store: Opener) -> None:
    stores = [open_store(), open_store()]
    stores[0].put("versions/high-water", b"0")
    assert stores[1].wait_synced(DEADLINE)
    allocated: list[list[int]] = [[], []]

    def allocate(index: int) -> None:
        store = stores[index]
        while len(allocated[index]) < 25:
            current = store.get("versions/high-water")
            assert current is not None
            mine = int(current) + 1
            if store.compare_and_put("versions/high-water", current, str(mine).encode()):
                allocated[index].append(mine)

    threads = [threading.Thread(target=allocate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = allocated[0] + allocated[1]
    assert sorted(together) == list(range(1, 51))
    assert all(a < b for a, b in zip(allocated[0], allocated[0][1:], strict=False))


def test_keys_of_an_expired_lease_vanish_from_the_mirrors(open_store: Opener) -> None:
    store, other = open_store(), open_store()
    lease = store.grant_lease(1)
    store.put_leased("replicas/r1", b"{}", lease)
    assert other.wait_synced(DEADLINE) and other.get("replicas/r1") == b"{}"
    # no keepalive: etcd expires the lease and deletes the key; both watches see it go
    until(lambda: store.get("replicas/r1") is None and other.get("replicas/r1") is None, "the lease to expire")
    assert store.keepalive(lease) is False


def test_revoke_drops_the_leases_keys_at_once(open_store: Opener) -> None:
    store = open_store()
    lease = store.grant_lease(30)
    store.put_leased("replicas/r1", b"{}", lease)
    store.put("replicas/static", b"{}")
    assert store.keepalive(lease) is True
    store.revoke(lease)
    assert store.keys("replicas/") == ["replicas/static"]
    store.revoke(lease)  # already gone: no error
    assert store.keepalive(lease) is False


def test_proxy_ids_with_upper_case_are_keys_and_bad_input_changes_nothing(open_store: Opener) -> None:
    store = open_store()
    store.put_many({f"proxies/Web_{n}": str(n).encode() for n in range(150)})  # 3 transactions
    assert len(store.keys("proxies/")) == 150
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_many({"proxies/ok": b"1", "proxies/not ok": b"2"})
    assert store.get("proxies/ok") is None
    with pytest.raises(StoreError, match="folder"):
        store.keys("proxies")


def test_without_etcd_reads_answer_from_the_mirror_and_writes_fail(open_store: Opener, etcd_server: Any) -> None:
    store, other = open_store(), open_store()
    store.put("rollout/state", b"{}")
    store.put("proxies/gone", b"1")
    seen = Recorder()
    store.subscribe("proxies/", seen)

    etcd_server.kill()
    until(lambda: not store.health().available, "the probe to find etcd gone")
    health = store.health()
    assert health.read_only and health.error and "cannot be reached" in health.error
    assert health.since is not None and health.since.endswith("Z")
    datetime.fromisoformat(health.since)
    assert store.get("rollout/state") == b"{}" and store.keys("rollout/") == ["rollout/state"]
    with pytest.raises(StoreUnavailable, match="etcd cannot be reached for put rollout/state"):
        store.put("rollout/state", b"new")
    assert store.get("rollout/state") == b"{}"

    etcd_server.start()
    other.put("proxies/new", b"2")  # written while `store` may still be away
    other.delete("proxies/gone")
    until(lambda: store.health().available, "the store to find etcd back")
    assert store.health().since is None and store.health().error is None
    until(lambda: store.get("proxies/new") == b"2" and store.get("proxies/gone") is None, "the resync")
    until(lambda: len(seen) >= 2, "the subscriber to hear of both changes")
    assert sorted(seen.seen, key=lambda item: item[0]) == [("proxies/gone", None), ("proxies/new", b"2")]
    store.put("rollout/state", b"new")
    assert other.wait_synced(DEADLINE) and other.get("rollout/state") == b"new"


def test_a_watch_that_goes_quiet_is_replaced(open_store: Opener) -> None:
    store, other = open_store(), open_store()
    seen = Recorder()
    store.subscribe("x/", seen)
    watch = store._feed._watch  # a stream that breaks without a word looks exactly like this
    assert watch is not None
    watch.stop()
    other.put("x/after", b"1")
    until(lambda: store.get("x/after") == b"1", "the probe to notice and resync")
    assert store._feed._watch is not watch and store.health().available
    until(lambda: len(seen) >= 1, "the subscriber")
    assert seen.seen == [("x/after", b"1")]
    other.put("x/after", b"2")  # and the new watch carries on
    assert store.wait_synced(DEADLINE) and store.get("x/after") == b"2"


def test_start_without_etcd_gives_up_after_sync_timeout(etcd_server: Any) -> None:
    before = set(threading.enumerate())
    etcd_server.kill()
    store = EtcdStore(parse_etcd_url(etcd_server.url), sync_timeout=0.3)
    with pytest.raises(StoreUnavailable, match="within 0.3s"):
        store.start()
    assert set(threading.enumerate()) - before == set()


def test_close_leaves_no_threads_behind(etcd_server: Any) -> None:
    before = set(threading.enumerate())
    store = EtcdStore(parse_etcd_url(etcd_server.url), probe_interval=0.05)
    store.start()
    store.subscribe("", Recorder())
    store.put("x/k", b"v")
    assert store.wait_synced(DEADLINE)
    assert set(threading.enumerate()) - before  # a watch, a probe and a dispatcher run
    store.close()
    assert set(threading.enumerate()) - before == set()
    # and after etcd went away under a running store
    store = EtcdStore(parse_etcd_url(etcd_server.url), probe_interval=0.05)
    store.start()
    etcd_server.kill()
    until(lambda: not store.health().available, "the probe to find etcd gone")
    store.close()
    assert set(threading.enumerate()) - before == set()


def test_a_resync_tells_subscribers_what_changed_and_keeps_newer_own_writes() -> None:
    mirror = Mirror()
    seen = Recorder()
    mirror.subscribe("x/", seen)
    mirror.start()
    try:
        same = KeyMeta(b"s", 2, 2)
        mirror.load({"x/same": same, "x/changed": KeyMeta(b"old", 3, 3), "x/gone": KeyMeta(b"g", 4, 4)}, 4)
        mirror.apply("x/mine", KeyMeta(b"m", 9, 9), 9)  # an own write the next read is older than
        mirror.apply("x/deleted", None, 10)
        mirror.load({"x/same": same, "x/changed": KeyMeta(b"new", 3, 7), "x/deleted": KeyMeta(b"d", 5, 5)}, 8)
        mirror.apply("x/changed", KeyMeta(b"older echo", 3, 6), 6)  # an old event: ignored
    finally:
        mirror.close()
    first = [("x/same", b"s"), ("x/changed", b"old"), ("x/gone", b"g"), ("x/mine", b"m")]
    assert seen.seen == [*first, ("x/changed", b"new"), ("x/gone", None)]  # close() delivered all
    assert mirror.keys("x/") == ["x/changed", "x/mine", "x/same"]


# -- values larger than one etcd request (etcd_chunks.py) ---------------------------


def _etcd_keys(server: Any, prefix: str) -> list[str]:
    """Every raw etcd key under `prefix` (read with a connection of the test's own)."""
    connection = EtcdConnection(parse_etcd_url(server.url), timeout=5)
    try:
        found, _ = connection.call(lambda c: read_prefix(c, prefix), "read")
        return sorted(prefix + key for key in found)
    finally:
        connection.close()


@pytest.mark.parametrize("chunk_size", [DEFAULT_CHUNK_SIZE, 64 * 1024])
def test_a_large_value_is_stored_in_parts_and_read_whole_through_another_mirror(
    open_store: Opener, etcd_server: Any, chunk_size: int
) -> None:
    writer, reader = open_store(chunk_size=chunk_size), open_store(chunk_size=chunk_size)
    heard = Recorder()
    reader.subscribe("bundles/", heard)
    big = secrets.token_bytes(3 * 1024 * 1024)
    writer.put("bundles/sha256-big", big)
    assert writer.get("bundles/sha256-big") == big  # read-your-writes
    assert reader.wait_synced(DEADLINE)
    assert reader.get("bundles/sha256-big") == big
    assert reader.keys("bundles/") == ["bundles/sha256-big"]
    parts = _etcd_keys(etcd_server, "/starmesh/chunks/")
    assert len(parts) == -(-len(big) // chunk_size)
    until(lambda: len(heard) >= 1, "the subscriber to hear of the key")
    assert heard.seen == [("bundles/sha256-big", big)]  # once, whole, not once per part

    assert writer.compare_and_put("bundles/sha256-big", b"not it", b"small") is False
    replacement = secrets.token_bytes(len(big))
    assert writer.compare_and_put("bundles/sha256-big", big, replacement) is True
    assert reader.wait_synced(DEADLINE) and reader.get("bundles/sha256-big") == replacement
    assert len(_etcd_keys(etcd_server, "/starmesh/chunks/")) == len(parts)  # the old parts went

    writer.delete("bundles/sha256-big")
    assert reader.wait_synced(DEADLINE) and reader.get("bundles/sha256-big") is None
    assert _etcd_keys(etcd_server, "/starmesh/chunks/") == []


def test_parts_let_an_etcd_with_a_small_request_limit_take_a_bundle_sized_value(etcd_factory: Any) -> None:
    server = etcd_factory("small", extra_args=["--max-request-bytes", str(64 * 1024)])
    value = secrets.token_bytes(300 * 1024)
    whole = EtcdStore(parse_etcd_url(server.url), probe_interval=0.1, chunk_size=1024 * 1024)
    parted = EtcdStore(parse_etcd_url(server.url), probe_interval=0.1, chunk_size=32 * 1024)
    whole.start()
    parted.start()
    try:
        with pytest.raises(StoreError, match="etcd refused put bundles/sha256-b"):
            whole.put("bundles/sha256-b", value)  # one request: over the limit
        parted.put("bundles/sha256-b", value)
        assert whole.wait_synced(DEADLINE) and whole.get("bundles/sha256-b") == value
    finally:
        whole.close()
        parted.close()


@pytest.mark.parametrize("damage", ["alter", "remove"])
def test_a_damaged_part_is_a_store_error_naming_the_key(open_store: Opener, etcd_server: Any, damage: str) -> None:
    writer, reader = open_store(chunk_size=1024), open_store(chunk_size=1024)
    writer.put("bundles/sha256-c", secrets.token_bytes(5000))
    part = _etcd_keys(etcd_server, "/starmesh/chunks/bundles/sha256-c/")[2]
    connection = EtcdConnection(parse_etcd_url(etcd_server.url), timeout=5)
    try:
        if damage == "alter":
            connection.call(lambda c: c.put(part, b"x" * 1024), "alter a part")
        else:
            connection.call(lambda c: c.delete(part), "remove a part")
    finally:
        connection.close()
    assert reader.wait_synced(DEADLINE)
    says = "do not add up" if damage == "alter" else "part 3 of 5 .* is missing"
    with pytest.raises(StoreError, match=f"store key bundles/sha256-c: .*{says}"):
        reader.get("bundles/sha256-c")


def test_a_fenced_large_write_by_a_deposed_leader_publishes_nothing(open_store: Opener, etcd_server: Any) -> None:
    store = open_store(chunk_size=1024)
    fence = store.create_leased("leader", b"{}", store.grant_lease(30))
    assert fence is not None
    with pytest.raises(NotLeader):
        store.fenced(lambda: fence + 1).put("bundles/sha256-d", secrets.token_bytes(5000))
    assert store.get("bundles/sha256-d") is None
    assert _etcd_keys(etcd_server, "/starmesh/chunks/") == []  # refused at the first part
    store.fenced(lambda: fence).put("bundles/sha256-d", b"\x00starmesh:chunked\n" + b"{}" * 900)
    assert store.get("bundles/sha256-d") == b"\x00starmesh:chunked\n" + b"{}" * 900  # escaped, not a pointer


def test_the_parts_folder_is_reserved(open_store: Opener) -> None:
    with pytest.raises(StoreError, match="chunks/ holds the parts of large values"):
        open_store().put("chunks/x", b"v")
