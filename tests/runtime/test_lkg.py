"""Last-known-good on disk: two generations, the release envelope, the high-water mark, crashes."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import starmesh.runtime.lkg as lkg_module
from starmesh.bundle.canonical import digest_of
from starmesh.bundle.files import TEMP_PREFIX
from starmesh.bundle.keys import PrivateKey
from starmesh.bundle.release import issue_release
from starmesh.runtime.errors import LastKnownGoodError
from starmesh.runtime.lkg import (
    GENERATION_FILES,
    HighWater,
    LastKnownGood,
    load_last_known_good,
    load_state,
    save_last_known_good,
    verify_stored,
)

POLICY = """
mesh(name = "{mesh}", mtls = "disable")
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{version}": 100}})])
"""

KEY = PrivateKey.generate()


def bundle(rt: Any, tmp_path: Path, version: str, mesh: str = "t") -> bytes:
    return rt.compile_policy(tmp_path / f"policy-{version}-{mesh}", POLICY.format(version=version, mesh=mesh))


def generation(data: bytes, release: int | None, *, key: PrivateKey = KEY, endpoints: Any = None) -> LastKnownGood:
    envelope = None
    if release is not None:
        envelope = issue_release(
            mesh="t", version=release, bundle=digest_of(data), previous=None, commit=None, key=key,
            now=datetime.now(UTC),
        ).envelope
    return LastKnownGood(
        data=data,
        digest=digest_of(data),
        release_version=release,
        applied_at="2026-01-01T00:00:00.000Z",
        origin="control-plane" if release is not None else "file",
        endpoints=endpoints or {},
        endpoints_version=0,
        envelope=envelope,
    )


def slot_of(state: Path, number: int) -> Path:
    for name in GENERATION_FILES:
        path = state / name
        if path.exists() and json.loads(path.read_text())["generation"] == number:
            return path
    raise AssertionError(f"no generation {number} in {state}")


@pytest.fixture
def two(tmp_path: Path, rt: Any) -> tuple[Path, bytes, bytes]:
    """A state dir holding release 1 (bundle v1) and release 2 (bundle v2)."""
    state = tmp_path / "state"
    state.mkdir()
    v1, v2 = bundle(rt, tmp_path, "v1"), bundle(rt, tmp_path, "v2")
    save_last_known_good(state, generation(v1, 1))
    save_last_known_good(state, generation(v2, 2))
    return state, v1, v2


def test_round_trip_keeps_the_envelope_and_the_high_water_mark(two: tuple[Path, bytes, bytes]) -> None:
    state, v1, v2 = two
    loaded = load_state(state)
    assert [(g.generation, g.digest, g.release_version) for g in loaded.generations] == [
        (2, digest_of(v2), 2),
        (1, digest_of(v1), 1),
    ]
    assert loaded.problems == ()
    assert loaded.high_water == HighWater(2, digest_of(v2))
    newest = loaded.generations[0]
    assert newest.data == v2 and newest.envelope is not None
    assert verify_stored(newest, [KEY.public_key()]).version == 2
    assert sorted(p.name for p in (state / "bundles").iterdir()) == sorted(
        d.replace(":", "-") + ".json" for d in (digest_of(v1), digest_of(v2))
    )


def _bad_json(state: Path, newest: Path, v2: bytes) -> None:
    newest.write_text('{"generation": 2, "dig')


def _missing_bundle(state: Path, newest: Path, v2: bytes) -> None:
    (state / "bundles" / (digest_of(v2).replace(":", "-") + ".json")).unlink()


def _digest_mismatch(state: Path, newest: Path, v2: bytes) -> None:
    (state / "bundles" / (digest_of(v2).replace(":", "-") + ".json")).write_bytes(v2.replace(b"v2", b"v1"))


def _bad_envelope(state: Path, newest: Path, v2: bytes) -> None:
    meta = json.loads(newest.read_text())
    meta["envelope"] = base64.b64encode(b'{"payloadType": "x", "payload": "", "signatures": []}').decode()
    newest.write_text(json.dumps(meta))


def _envelope_of_another_release(state: Path, newest: Path, v2: bytes) -> None:
    meta = json.loads(newest.read_text())
    other = issue_release(mesh="t", version=9, bundle=digest_of(v2), previous=None, commit=None, key=KEY,
                          now=datetime.now(UTC)).envelope
    meta["envelope"] = base64.b64encode(other).decode()
    newest.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (_bad_json, "last-known-good.b.json: corrupt: Input data was truncated"),
        (_missing_bundle, "that last-known-good"),
        (_digest_mismatch, "corrupt: its bytes hash to"),
        (_bad_envelope, "corrupt: its release envelope: payloadType is 'x'"),
        (_envelope_of_another_release, "it is release 9 of bundle"),
    ],
    ids=["bad-json", "missing-bundle", "digest-mismatch", "bad-envelope", "envelope-of-another-release"],
)
def test_a_corrupt_newest_falls_back_to_the_previous(
    two: tuple[Path, bytes, bytes], corrupt: Callable[[Path, Path, bytes], None], problem: str
) -> None:
    state, v1, v2 = two
    corrupt(state, slot_of(state, 2), v2)
    loaded = load_state(state)
    assert [(g.generation, g.digest) for g in loaded.generations] == [(1, digest_of(v1))]
    assert len(loaded.problems) == 1 and problem in loaded.problems[0], loaded.problems
    lkg = load_last_known_good(state)
    assert lkg is not None and lkg.digest == digest_of(v1)
    # The mark of the corrupt newest still counts when its JSON can be read.
    expected = 1 if corrupt is _bad_json else 2
    assert loaded.high_water is not None and loaded.high_water.version == expected


def test_only_when_both_are_bad_is_there_none(two: tuple[Path, bytes, bytes]) -> None:
    state, v1, v2 = two
    for path in (state / "bundles").iterdir():
        path.write_bytes(b"{}")
    loaded = load_state(state)
    assert loaded.generations == () and len(loaded.problems) == 2
    with pytest.raises(LastKnownGoodError, match="corrupt: its bytes hash to") as info:
        load_last_known_good(state)
    assert str(info.value).count("corrupt") == 2
    assert loaded.high_water == HighWater(2, digest_of(v2))
    assert load_last_known_good(state.parent / "empty") is None


def test_a_new_save_after_a_corrupt_newest_keeps_the_loadable_one(
    two: tuple[Path, bytes, bytes], tmp_path: Path, rt: Any
) -> None:
    state, v1, v2 = two
    _digest_mismatch(state, slot_of(state, 2), v2)
    v3 = bundle(rt, tmp_path, "v1", mesh="t3")
    save_last_known_good(state, generation(v3, 3))
    loaded = load_state(state)
    # The new generation went into the corrupt slot; generation 1 (the loadable one) is kept.
    assert [g.generation for g in loaded.generations] == [3, 1]


def test_an_endpoints_only_change_rewrites_the_newest_in_place(two: tuple[Path, bytes, bytes]) -> None:
    state, v1, v2 = two
    save_last_known_good(state, generation(v2, 2, endpoints={"api": {"v1": ("127.0.0.1:7001",)}}))
    loaded = load_state(state)
    assert [(g.generation, g.digest) for g in loaded.generations] == [(3, digest_of(v2)), (1, digest_of(v1))]
    assert dict(loaded.generations[0].endpoints) == {"api": {"v1": ("127.0.0.1:7001",)}}


def test_the_high_water_mark_never_goes_down(two: tuple[Path, bytes, bytes]) -> None:
    state, v1, v2 = two
    save_last_known_good(state, generation(v1, None))  # a --bundle file after releases
    loaded = load_state(state)
    assert loaded.generations[0].release_version is None
    assert loaded.high_water == HighWater(2, digest_of(v2))


def test_verify_stored_needs_a_trusted_signature(two: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    state, v1, v2 = two
    newest = load_state(state).generations[0]
    with pytest.raises(LastKnownGoodError, match="its release does not verify: no valid signature by a trusted key"):
        verify_stored(newest, [PrivateKey.generate().public_key()])
    with pytest.raises(LastKnownGoodError, match="has no signed release"):
        verify_stored(generation(v1, None), [KEY.public_key()])


class Crash(BaseException):
    """A kill -9 at this point: nothing after it runs."""


def test_a_crash_at_any_step_of_a_save_leaves_a_loadable_generation(
    two: tuple[Path, bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rt: Any
) -> None:
    state, v1, v2 = two
    v3 = bundle(rt, tmp_path, "v1", mesh="t3")
    real_write, real_unlink = lkg_module.write_atomically, Path.unlink
    steps = 0
    crash_at = -1

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps == crash_at:
            raise Crash

    def write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        step()
        # A crash inside write_atomically leaves at most a temp file behind.
        (path.parent / f"{TEMP_PREFIX}crash.tmp").write_bytes(data[: len(data) // 2])
        step()
        real_write(path, data, mode=mode)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        step()
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(lkg_module, "write_atomically", write)
    monkeypatch.setattr(Path, "unlink", unlink)
    save_last_known_good(state, generation(v3, 3))
    total = steps
    assert total >= 5  # bundle, generation, clean-ups
    for crash_at in range(1, total + 1):
        case = tmp_path / f"crash-{crash_at}"
        monkeypatch.setattr(Path, "unlink", real_unlink)
        save_to = case / "state"
        save_to.mkdir(parents=True)
        save_last_known_good(save_to, generation(v1, 1))
        save_last_known_good(save_to, generation(v2, 2))
        monkeypatch.setattr(Path, "unlink", unlink)
        steps = 0
        with pytest.raises(Crash):
            save_last_known_good(save_to, generation(v3, 3))
        monkeypatch.setattr(Path, "unlink", real_unlink)
        loaded = load_state(save_to)
        assert loaded.generations, f"crash at step {crash_at}: nothing loadable"
        assert loaded.generations[0].digest in (digest_of(v2), digest_of(v3)), f"crash at step {crash_at}"
        # Never a generation naming what is not (yet) on disk: the bundle goes first.
        assert loaded.problems == (), f"crash at step {crash_at}: {loaded.problems}"
        # The next save (after the restart) cleans up what the crash left.
        save_last_known_good(save_to, generation(v3, 3))
        assert not [p for p in save_to.rglob(f"{TEMP_PREFIX}*")]
        assert load_state(save_to).generations[0].digest == digest_of(v3)
