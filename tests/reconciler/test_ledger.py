"""The control plane's durable records: store, ledger and issuer on a real state dir."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from starmesh.bundle.release import verify_release
from starmesh.reconciler.errors import StoreError, UnknownBundle
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import RELEASE_HISTORY, Ledger
from starmesh.reconciler.model import CompileStatus
from starmesh.reconciler.store import FileStore

POLICY = """\
mesh(name = "shop")
service(name = "cart", versions = ["v1", "v2"])
http_route("cart", rules = [rule(backends = {"v1": %d, "v2": %d})])
"""

Bundles = Callable[[int], bytes]


@pytest.fixture
def bundle(tmp_path: Path, h: Any) -> Bundles:
    """A bundle (its bytes) sending `v1` percent of `cart` to v1, the rest to v2."""
    return lambda v1: h.compile_policy(tmp_path / f"policy-{v1}", POLICY % (v1, 100 - v1))


@pytest.fixture
def keys(tmp_path: Path, h: Any) -> Any:
    return h.keys(tmp_path / "keys")


def test_file_store_round_trip_and_keys(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "state")
    assert store.get("a/b") is None
    store.put("a/b", b"one")
    store.put("a/c", b"two")
    assert store.get("a/b") == b"one"
    assert store.keys("a/") == ["a/b", "a/c"]
    assert store.compare_and_put("a/b", b"one", b"three")
    assert not store.compare_and_put("a/b", b"one", b"four")
    assert not store.compare_and_put("a/new", b"x", b"y")
    assert store.compare_and_put("a/new", None, b"y")
    store.delete("a/b")
    store.delete("a/b")
    assert store.get("a/b") is None
    assert (tmp_path / "state" / "a" / "c").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("key", ["../x", "/abs", "A/b", "a//b", "", "a/.hidden"])
def test_file_store_refuses_keys_outside_its_layout(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        FileStore(tmp_path).put(key, b"x")


def test_versions_only_go_up_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ledger = Ledger(FileStore(state))
    assert [ledger.next_version() for _ in range(3)] == [1, 2, 3]
    again = Ledger(FileStore(state))  # a restarted control plane
    assert again.next_version() == 4


def test_lost_high_water_file_never_lowers_versions(tmp_path: Path, keys: Any, bundle: Bundles) -> None:
    state = tmp_path / "state"
    ledger = Ledger(FileStore(state))
    digest = ledger.put_bundle(bundle(90))
    issuer = Issuer(ledger, keys.signer())
    for _ in range(3):
        issuer.issue(digest, commit=None, reason="commit")
    (state / "versions" / "high-water").unlink()
    assert Ledger(FileStore(state)).next_version() == 4


def test_corrupt_high_water_is_a_store_error(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("versions/high-water", b"seven")
    with pytest.raises(StoreError, match="not a version number"):
        Ledger(store).next_version()


def test_bundles_are_stored_by_digest_and_checked_on_read(tmp_path: Path, bundle: Bundles) -> None:
    store = FileStore(tmp_path)
    ledger = Ledger(store)
    data = bundle(90)
    digest = ledger.put_bundle(data)
    assert ledger.put_bundle(data) == digest
    assert ledger.bundle(digest) == data and ledger.has_bundle(digest)
    store.put("bundles/" + digest.replace(":", "-"), data + b" ")
    with pytest.raises(UnknownBundle, match="does not match its digest"):
        ledger.bundle(digest)
    with pytest.raises(UnknownBundle, match="no bundle"):
        ledger.bundle("sha256:" + "0" * 64)
    with pytest.raises(UnknownBundle, match="not a bundle digest"):
        ledger.bundle("sha256:xyz")
    assert not ledger.has_bundle("nonsense")


def test_issued_releases_verify_and_chain_previous(tmp_path: Path, keys: Any, bundle: Bundles) -> None:
    ledger = Ledger(FileStore(tmp_path / "state"))
    first = ledger.put_bundle(bundle(90))
    second = ledger.put_bundle(bundle(50))
    now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    issuer = Issuer(ledger, keys.signer(), ttl=timedelta(hours=2), now=lambda: now)
    one = issuer.issue(first, commit="a" * 40, reason="commit")
    two = issuer.issue(second, commit="b" * 40, reason="commit")
    assert (one.version, one.previous, two.version, two.previous) == (1, None, 2, first)
    assert ledger.current() == two and ledger.release(1) == one
    assert [r.version for r in ledger.releases()] == [1, 2]
    trusted = keys.trusted()
    verified = verify_release(two.envelope, trusted, applied_version=1, applied_digest=first, now=now)
    assert verified.release.bundle == second and verified.release.mesh == "shop"
    assert verified.release.expires_at == "2026-11-26T11:00:00Z"
    assert issuer.reissue_at(two) == now + timedelta(hours=1)
    assert not issuer.reissue_due(two)
    later = Issuer(ledger, keys.signer(), ttl=timedelta(hours=2), now=lambda: now + timedelta(hours=1))
    assert later.reissue_due(two)


def test_issuing_an_unknown_bundle_fails_without_using_a_version(tmp_path: Path, keys: Any) -> None:
    ledger = Ledger(FileStore(tmp_path))
    with pytest.raises(UnknownBundle):
        Issuer(ledger, keys.signer()).issue("sha256:" + "1" * 64, commit=None, reason="rollback")
    assert ledger.high_water() == 0 and ledger.current() is None


def test_release_history_is_bounded_but_kept_versions_stay(tmp_path: Path, keys: Any, bundle: Bundles) -> None:
    ledger = Ledger(FileStore(tmp_path))
    digest = ledger.put_bundle(bundle(90))
    issuer = Issuer(ledger, keys.signer())
    issuer.issue(digest, commit=None, reason="commit")
    ledger.keep_releases([1])
    for _ in range(RELEASE_HISTORY + 5):
        issuer.issue(digest, commit=None, reason="reissue")
    versions = [r.version for r in ledger.releases()]
    assert len(versions) == RELEASE_HISTORY + 1 and versions[-1] == RELEASE_HISTORY + 6
    assert ledger.release(1) is not None and ledger.release(2) is None


def test_compile_status_and_progress_round_trip(tmp_path: Path) -> None:
    ledger = Ledger(FileStore(tmp_path))
    assert ledger.last_compile() is None and ledger.last_commit() is None
    status = CompileStatus(
        commit="c" * 40,
        ok=False,
        digest=None,
        at="2026-11-26T09:00:00.000Z",
        diagnostics=({"file": "mesh.star", "line": 3, "col": 1, "code": "SM101", "message": "syntax error"},),
    )
    ledger.set_last_compile(status)
    ledger.set_last_commit("c" * 40)
    again = Ledger(FileStore(tmp_path))
    assert again.last_compile() == status and again.last_commit() == "c" * 40
    assert status.to_json()["diagnostics"] == [dict(status.diagnostics[0])]
