"""The Store contract, checked the same way on FileStore and EtcdStore (a real etcd).

Whatever the Ledger and the Rollout rely on (get, put, compare_and_put, delete, keys and
health) must mean the same on a state dir and on etcd.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from starmesh.reconciler.errors import StoreError
from starmesh.reconciler.etcd_chunks import DEFAULT_CHUNK_SIZE, ESCAPE_MAGIC, POINTER_MAGIC
from starmesh.reconciler.etcd_client import parse_etcd_url
from starmesh.reconciler.etcd_store import EtcdStore
from starmesh.reconciler.store import FileStore, Store


@pytest.fixture(params=["file", "etcd", "etcd-in-parts"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """FileStore; EtcdStore; EtcdStore storing every value over 100 bytes in parts."""
    if request.param == "file":
        yield FileStore(tmp_path / "state")
        return
    server: Any = request.getfixturevalue("etcd_server")
    chunk_size = 100 if request.param == "etcd-in-parts" else DEFAULT_CHUNK_SIZE
    etcd = EtcdStore(parse_etcd_url(server.url + "/conformance"), probe_interval=0.1, chunk_size=chunk_size)
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.close()


def test_a_key_never_written_reads_none(store: Store) -> None:
    assert store.get("status/last-commit") is None


def test_put_then_get_gives_the_bytes_back(store: Store) -> None:
    store.put("bundles/sha256-ab", bytes(range(256)))
    store.put("status/empty", b"")
    assert store.get("bundles/sha256-ab") == bytes(range(256))
    assert store.get("status/empty") == b""
    store.put("bundles/sha256-ab", b"second")
    assert store.get("bundles/sha256-ab") == b"second"


def test_large_values_and_values_that_look_like_framing_come_back_as_written(store: Store) -> None:
    large = bytes(range(256)) * 40
    store.put("bundles/sha256-large", large)
    assert store.get("bundles/sha256-large") == large
    assert store.keys("bundles/") == ["bundles/sha256-large"]
    assert store.compare_and_put("bundles/sha256-large", large[:-1], b"x") is False
    assert store.compare_and_put("bundles/sha256-large", large, large[::-1]) is True
    assert store.get("bundles/sha256-large") == large[::-1]
    for tricky in (POINTER_MAGIC + b'{"chunks":2,"sha256":"' + b"0" * 64 + b'","size":1}', ESCAPE_MAGIC, b"\x00"):
        store.put("status/tricky", tricky)
        assert store.get("status/tricky") == tricky
        assert store.compare_and_put("status/tricky", tricky, tricky + b"!") is True
        assert store.get("status/tricky") == tricky + b"!"
    store.delete("bundles/sha256-large")
    assert store.get("bundles/sha256-large") is None and store.keys("bundles/") == []


def test_compare_and_put_creates_only_when_absent(store: Store) -> None:
    assert store.compare_and_put("versions/high-water", None, b"1") is True
    assert store.compare_and_put("versions/high-water", None, b"2") is False
    assert store.get("versions/high-water") == b"1"


def test_compare_and_put_replaces_only_the_expected_value(store: Store) -> None:
    store.put("versions/high-water", b"7")
    assert store.compare_and_put("versions/high-water", b"6", b"9") is False
    assert store.get("versions/high-water") == b"7"
    assert store.compare_and_put("versions/high-water", b"7", b"8") is True
    assert store.get("versions/high-water") == b"8"


def test_compare_and_put_with_a_value_fails_on_an_absent_key(store: Store) -> None:
    assert store.compare_and_put("versions/high-water", b"1", b"2") is False
    assert store.get("versions/high-water") is None


def test_compare_and_put_with_an_empty_value(store: Store) -> None:
    store.put("status/flag", b"")
    assert store.compare_and_put("status/flag", None, b"x") is False
    assert store.compare_and_put("status/flag", b"", b"x") is True
    assert store.get("status/flag") == b"x"


def test_delete_removes_and_tolerates_absence(store: Store) -> None:
    store.put("rollout/state", b"{}")
    store.delete("rollout/state")
    assert store.get("rollout/state") is None
    assert store.keys("rollout/") == []
    store.delete("rollout/state")
    store.delete("never/written")
    assert store.compare_and_put("rollout/state", None, b"again") is True


def test_keys_lists_direct_children_sorted(store: Store) -> None:
    for name in ("releases/000000000010", "releases/000000000002", "releases/old/000000000001", "top"):
        store.put(name, b"x")
    assert store.keys("releases/") == ["releases/000000000002", "releases/000000000010"]
    assert store.keys("releases/old/") == ["releases/old/000000000001"]
    assert store.keys("") == ["top"]
    assert store.keys("nothing/") == []


@pytest.mark.parametrize("key", ["", "a//b", "a/", "/a", "a b", "a/../b\n", "x" * 513])
def test_invalid_keys_are_refused(store: Store, key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        store.put(key, b"x")
    with pytest.raises(StoreError, match="invalid store key"):
        store.get(key)


def test_health_says_available(store: Store) -> None:
    health = store.health().to_json()
    assert health["available"] is True and health["read_only"] is False
    assert health["since"] is None and health["error"] is None
    assert set(health) == {"kind", "available", "read_only", "since", "error", "member", "revision"}
