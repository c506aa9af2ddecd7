"""`starmesh keygen` and `starmesh verify`: real Ed25519 keys, real signed envelopes."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.dsse import sign_envelope
from starmesh.bundle.keys import keyid_of, load_private_key, load_public_key
from starmesh.bundle.release import issue_release
from starmesh.cli.main import main

BUNDLE = b'{"apiVersion":"starmesh/v1","kind":"Bundle"}'


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None})


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def keys(runner: CliRunner, tmp_path: Path) -> Path:
    result = run(runner, "keygen", "--out", str(tmp_path / "keys"))
    assert result.exit_code == 0, result.output
    return tmp_path / "keys"


def write_release(
    directory: Path, keys: Path, *, now: datetime | None = None, ttl: timedelta = timedelta(days=7)
) -> tuple[Path, Path]:
    """A signed release of BUNDLE (version 4) and the bundle file; returns (envelope, bundle)."""
    key = load_private_key(keys / "signing.key")
    signed = issue_release(
        mesh="shop",
        version=4,
        bundle=digest_of(BUNDLE),
        previous=None,
        commit="0123456789abcdef0123456789abcdef01234567",
        key=key,
        now=now or datetime.now(UTC),
        ttl=ttl,
    )
    envelope = directory / "release.json"
    envelope.write_bytes(signed.envelope)
    bundle = directory / "bundle.json"
    bundle.write_bytes(BUNDLE)
    return envelope, bundle


# -- keygen --------------------------------------------------------------------------


def test_keygen_writes_a_private_key_0600_and_a_public_key(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    result = run(runner, "keygen", "--out", str(out))
    assert result.exit_code == 0, result.output
    private, public = out / "signing.key", out / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    keyid = keyid_of(load_public_key(public))
    assert keyid == keyid_of(load_private_key(private))
    assert str(private) in result.output and str(public) in result.output
    assert f"keyid        {keyid}" in result.output


def test_keygen_refuses_to_overwrite_an_existing_key(runner: CliRunner, keys: Path) -> None:
    before = (keys / "signing.key").read_bytes(), (keys / "signing.pub").read_bytes()
    result = run(runner, "keygen", "--out", str(keys))
    assert result.exit_code == 2
    assert "already exists" in result.output and "signing.key" in result.output
    assert ((keys / "signing.key").read_bytes(), (keys / "signing.pub").read_bytes()) == before


def test_keygen_refuses_when_only_the_public_key_exists(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "signing.pub").write_text("someone's key")
    result = run(runner, "keygen", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "signing.pub: already exists" in result.output
    assert not (tmp_path / "signing.key").exists()


def test_keygen_out_must_be_a_directory(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run(runner, "keygen", "--out", str(tmp_path / "file"))
    assert result.exit_code == 2
    assert "is a file" in result.output


# -- verify: success -----------------------------------------------------------------


def test_verify_a_good_envelope_prints_the_release(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, bundle = write_release(tmp_path, keys)
    result = run(runner, "verify", str(envelope), "--key", str(keys / "signing.pub"), "--bundle", str(bundle))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "verified: release 4 of mesh shop"
    assert f"  bundle    {digest_of(BUNDLE)}  (matches {bundle})" in lines
    assert "  commit    0123456789abcdef0123456789abcdef01234567" in lines
    assert f"  keyid     {keyid_of(load_public_key(keys / 'signing.pub'))}" in lines
    assert any(line.startswith("  expires   20") for line in lines)


def test_verify_with_several_keys_names_the_one_that_signed(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run(runner, "keygen", "--out", str(other)).exit_code == 0
    envelope, _ = write_release(tmp_path, keys)
    result = run(
        runner, "verify", str(envelope), "--key", str(other / "signing.pub"), "--key", str(keys / "signing.pub"),
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["verified"] is True and document["failure"] is None
    assert document["keyid"] == keyid_of(load_public_key(keys / "signing.pub"))
    assert document["release"]["version"] == 4 and document["release"]["bundle"] == digest_of(BUNDLE)
    assert document["bundle_file"] is None


# -- verify: failures (exit 1, the reason named) -------------------------------------


def verify_fails(runner: CliRunner, envelope: Path, *args: str) -> str:
    result = run(runner, "verify", str(envelope), *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("starmesh: verification failed: "), result.output
    return result.output


def test_a_flipped_payload_byte_is_a_bad_signature(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, _ = write_release(tmp_path, keys)
    document = json.loads(envelope.read_bytes())
    payload = bytearray(base64.b64decode(document["payload"]))
    at = payload.index(b'"version":4') + len(b'"version":')
    payload[at] = ord("9")  # version 4 -> 9: a different, still well-formed release
    document["payload"] = base64.b64encode(bytes(payload)).decode()
    envelope.write_text(json.dumps(document))
    output = verify_fails(runner, envelope, "--key", str(keys / "signing.pub"))
    keyid = keyid_of(load_public_key(keys / "signing.pub"))
    assert f"bad signature: the signature by key {keyid} does not verify" in output


def test_a_wrong_key_is_an_unknown_key(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run(runner, "keygen", "--out", str(other)).exit_code == 0
    envelope, _ = write_release(tmp_path, keys)
    output = verify_fails(runner, envelope, "--key", str(other / "signing.pub"))
    signer = keyid_of(load_public_key(keys / "signing.pub"))
    given = keyid_of(load_public_key(other / "signing.pub"))
    assert f"unknown key: signed by key {signer}, which is none of the keys given ({given})" in output


def test_an_expired_release_fails_with_its_expiry(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, _ = write_release(tmp_path, keys, now=datetime(2020, 1, 1, tzinfo=UTC), ttl=timedelta(days=7))
    output = verify_fails(runner, envelope, "--key", str(keys / "signing.pub"))
    assert "expired: release version 4 expired at 2020-01-08T00:00:00Z" in output


def test_an_expired_release_in_json_still_shows_the_release(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, _ = write_release(tmp_path, keys, now=datetime(2020, 1, 1, tzinfo=UTC))
    result = run(runner, "verify", str(envelope), "--key", str(keys / "signing.pub"), "--format", "json")
    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["verified"] is False
    assert document["failure"]["check"] == "expired"
    assert document["release"]["expires_at"] == "2020-01-08T00:00:00Z"


def test_a_different_bundle_is_a_digest_mismatch(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, bundle = write_release(tmp_path, keys)
    bundle.write_bytes(BUNDLE + b" ")
    output = verify_fails(runner, envelope, "--key", str(keys / "signing.pub"), "--bundle", str(bundle))
    expected, got = digest_of(BUNDLE), digest_of(BUNDLE + b" ")
    assert f"digest mismatch: bundle file {bundle} is not the bundle release 4 names: expected {expected}, got {got}" in output


def test_an_envelope_of_another_payload_type_is_refused(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope = tmp_path / "other.json"
    key = load_private_key(keys / "signing.key")
    envelope.write_bytes(sign_envelope(b"{}", key, payload_type="application/vnd.in-toto+json"))
    output = verify_fails(runner, envelope, "--key", str(keys / "signing.pub"))
    assert "payload type: payloadType is 'application/vnd.in-toto+json', not a starmesh release" in output


def test_a_signed_payload_that_is_not_a_release_is_refused(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope = tmp_path / "other.json"
    envelope.write_bytes(sign_envelope(b'{"mesh": "shop"}', load_private_key(keys / "signing.key")))
    output = verify_fails(runner, envelope, "--key", str(keys / "signing.pub"))
    assert "payload: invalid release" in output


def test_a_file_that_is_not_an_envelope_fails_verification(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope = tmp_path / "garbage.json"
    envelope.write_bytes(b"not json at all")
    output = verify_fails(runner, envelope, "--key", str(keys / "signing.pub"))
    assert "envelope: envelope is not valid JSON" in output


# -- verify: bad input (exit 2) ------------------------------------------------------


@pytest.mark.parametrize("which", ["envelope", "key", "bundle"])
def test_missing_files_are_bad_input(runner: CliRunner, keys: Path, tmp_path: Path, which: str) -> None:
    envelope, bundle = write_release(tmp_path, keys)
    missing = tmp_path / "missing.json"
    args = {
        "envelope": [str(missing), "--key", str(keys / "signing.pub")],
        "key": [str(envelope), "--key", str(missing)],
        "bundle": [str(envelope), "--key", str(keys / "signing.pub"), "--bundle", str(missing)],
    }[which]
    result = run(runner, "verify", *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("starmesh: error: ") and str(missing) in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_envelope_is_bad_input(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, _ = write_release(tmp_path, keys)
    envelope.chmod(0)
    result = run(runner, "verify", str(envelope), "--key", str(keys / "signing.pub"))
    assert result.exit_code == 2
    assert "cannot read envelope" in result.output and "Permission denied" in result.output


def test_a_private_key_given_as_key_is_bad_input(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, _ = write_release(tmp_path, keys)
    result = run(runner, "verify", str(envelope), "--key", str(keys / "signing.key"))
    assert result.exit_code == 2
    assert "this looks like a private key: pass the .pub file" in result.output


def test_verify_needs_a_key(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    envelope, _ = write_release(tmp_path, keys)
    result = run(runner, "verify", str(envelope))
    assert result.exit_code == 2
    assert "--key" in result.output


def test_a_directory_as_envelope_is_bad_input(runner: CliRunner, keys: Path, tmp_path: Path) -> None:
    result = run(runner, "verify", str(tmp_path), "--key", str(keys / "signing.pub"))
    assert result.exit_code == 2
    assert f"envelope {tmp_path} is a directory, not a file" in result.output
