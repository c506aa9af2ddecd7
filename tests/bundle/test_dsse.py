"""DSSE envelopes and Ed25519 key files: round trips, tampering, rotation, bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from starmesh.bundle.dsse import (
    MAX_SIGNATURES,
    RELEASE_PAYLOAD_TYPE,
    pae,
    sign_envelope,
    verify_envelope,
)
from starmesh.bundle.errors import BundleError, SignatureError
from starmesh.bundle.keys import (
    generate_keypair,
    keyid_of,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
)

PAYLOAD = b'{"mesh":"bookinfo","version":1}'


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _edit(envelope: bytes, **changes: object) -> bytes:
    document = json.loads(envelope)
    document.update(changes)
    return json.dumps(document).encode()


# --- PAE and the envelope format -----------------------------------------------------


def test_pae_matches_the_dsse_spec() -> None:
    # The example from the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_envelope_has_the_dsse_shape(key: Ed25519PrivateKey) -> None:
    envelope = json.loads(sign_envelope(PAYLOAD, key))
    assert set(envelope) == {"payloadType", "payload", "signatures"}
    assert envelope["payloadType"] == RELEASE_PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"]) == PAYLOAD
    [signature] = envelope["signatures"]
    assert set(signature) == {"keyid", "sig"}
    assert signature["keyid"] == keyid_of(key.public_key())
    # The signature covers PAE, not the bare payload.
    key.public_key().verify(
        base64.b64decode(signature["sig"]), pae(RELEASE_PAYLOAD_TYPE, PAYLOAD)
    )


def test_keyid_is_sha256_of_the_raw_public_key(key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert keyid_of(key.public_key()) == hashlib.sha256(raw).hexdigest()
    assert keyid_of(key) == keyid_of(key.public_key())


# --- verification ----------------------------------------------------------------------


def test_round_trip(key: Ed25519PrivateKey) -> None:
    assert verify_envelope(sign_envelope(PAYLOAD, key), [key.public_key()]) == PAYLOAD


def test_tampered_payload_is_rejected(key: Ed25519PrivateKey) -> None:
    envelope = sign_envelope(PAYLOAD, key)
    forged = _edit(envelope, payload=base64.b64encode(PAYLOAD.replace(b"1", b"2")).decode())
    with pytest.raises(SignatureError, match="no valid signature by a trusted key"):
        verify_envelope(forged, [key.public_key()])


def test_swapped_payload_type_is_rejected(key: Ed25519PrivateKey) -> None:
    envelope = sign_envelope(PAYLOAD, key, payload_type="application/x-other")
    with pytest.raises(SignatureError, match="payloadType is 'application/x-other'"):
        verify_envelope(envelope, [key.public_key()])
    # Relabelling it breaks the signature, since PAE covers the type.
    relabelled = _edit(envelope, payloadType=RELEASE_PAYLOAD_TYPE)
    with pytest.raises(SignatureError, match="no valid signature"):
        verify_envelope(relabelled, [key.public_key()])


def test_wrong_key_is_rejected_and_named(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError) as info:
        verify_envelope(sign_envelope(PAYLOAD, key), [other.public_key()])
    message = str(info.value)
    assert keyid_of(key)[:16] in message
    assert keyid_of(other)[:16] in message
    assert "--trust" in message


def test_any_trusted_key_suffices_during_rotation(key: Ed25519PrivateKey) -> None:
    new = Ed25519PrivateKey.generate()
    trusted = [key.public_key(), new.public_key()]
    assert verify_envelope(sign_envelope(PAYLOAD, key), trusted) == PAYLOAD
    assert verify_envelope(sign_envelope(PAYLOAD, new), trusted) == PAYLOAD


def test_an_untrusted_signature_beside_a_trusted_one_is_ignored(
    key: Ed25519PrivateKey,
) -> None:
    stranger = Ed25519PrivateKey.generate()
    theirs = json.loads(sign_envelope(PAYLOAD, stranger))["signatures"]
    ours = json.loads(sign_envelope(PAYLOAD, key))["signatures"]
    envelope = _edit(sign_envelope(PAYLOAD, key), signatures=theirs + ours)
    assert verify_envelope(envelope, [key.public_key()]) == PAYLOAD


def test_keyid_is_only_a_hint(key: Ed25519PrivateKey) -> None:
    document = json.loads(sign_envelope(PAYLOAD, key))
    document["signatures"][0]["keyid"] = "not-the-right-id"
    assert verify_envelope(json.dumps(document).encode(), [key.public_key()]) == PAYLOAD
    del document["signatures"][0]["keyid"]
    assert verify_envelope(json.dumps(document).encode(), [key.public_key()]) == PAYLOAD


def test_a_matching_keyid_does_not_stand_in_for_a_signature(key: Ed25519PrivateKey) -> None:
    document = json.loads(sign_envelope(PAYLOAD, key))
    document["signatures"][0]["sig"] = base64.b64encode(b"\0" * 64).decode()
    with pytest.raises(SignatureError, match="no valid signature"):
        verify_envelope(json.dumps(document).encode(), [key.public_key()])


def test_url_safe_base64_is_accepted(key: Ed25519PrivateKey) -> None:
    payload = b"\xfb\xff" * 10  # encodes with + and / in standard base64
    document = json.loads(sign_envelope(payload, key))
    document["payload"] = base64.urlsafe_b64encode(payload).decode()
    document["signatures"][0]["sig"] = base64.urlsafe_b64encode(
        base64.b64decode(document["signatures"][0]["sig"])
    ).decode()
    assert verify_envelope(json.dumps(document).encode(), [key.public_key()]) == payload


def test_no_trusted_keys_is_an_error(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_envelope(sign_envelope(PAYLOAD, key), [])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "malformed DSSE envelope: Expected `object`"),
        (b'{"payloadType": "x", "signatures": []}', "missing required field `payload`"),
        (
            b'{"payloadType": "%s", "payload": "e30=", "signatures": []}'
            % RELEASE_PAYLOAD_TYPE.encode(),
            "no signatures",
        ),
        (
            b'{"payloadType": "%s", "payload": "e30=", "signatures": [{"keyid": "k"}]}'
            % RELEASE_PAYLOAD_TYPE.encode(),
            "missing required field `sig`",
        ),
        (
            b'{"payloadType": "%s", "payload": "!!!", "signatures": [{"sig": "AA=="}]}'
            % RELEASE_PAYLOAD_TYPE.encode(),
            "payload is not valid base64",
        ),
        (
            b'{"payloadType": "%s", "payload": "e30=", "signatures": [{"sig": "A"}]}'
            % RELEASE_PAYLOAD_TYPE.encode(),
            r"signatures\[0\].sig is not valid base64",
        ),
        (
            b'{"payloadType": "%s", "payload": "e30=", "signatures": [{"sig": "AA=="}], "x": 1}'
            % RELEASE_PAYLOAD_TYPE.encode(),
            "unknown field `x`",
        ),
        (
            b'{"payloadType": 7, "payload": "e30=", "signatures": [{"sig": "AA=="}]}',
            r"Expected `str`, got `int` - at `\$.payloadType`",
        ),
    ],
)
def test_malformed_envelopes_are_rejected_clearly(
    key: Ed25519PrivateKey, data: bytes, message: str
) -> None:
    with pytest.raises(SignatureError, match=message):
        verify_envelope(data, [key.public_key()])


def test_oversized_envelopes_are_refused_before_parsing(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match="over the 1048576-byte limit"):
        verify_envelope(b" " * (1024 * 1024 + 1), [key.public_key()])


def test_too_many_signatures_are_refused(key: Ed25519PrivateKey) -> None:
    document = json.loads(sign_envelope(PAYLOAD, key))
    document["signatures"] = document["signatures"] * (MAX_SIGNATURES + 1)
    with pytest.raises(SignatureError, match="over the limit of 16"):
        verify_envelope(json.dumps(document).encode(), [key.public_key()])


# --- key files -----------------------------------------------------------------------


def test_generate_keypair_writes_pem_files(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "keys")
    assert private_path.name == "signing.key"
    assert public_path.name == "signing.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private = load_private_key(private_path)
    public = load_public_key(public_path)
    assert keyid_of(private) == keyid_of(public)
    assert verify_envelope(sign_envelope(PAYLOAD, private), [public]) == PAYLOAD


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    private_path, _ = generate_keypair(tmp_path)
    before = private_path.read_bytes()
    with pytest.raises(BundleError, match="signing.key: already exists"):
        generate_keypair(tmp_path)
    assert private_path.read_bytes() == before


def test_pem_round_trip(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(private_key_pem(key))
    (tmp_path / "p").write_bytes(public_key_pem(key.public_key()))
    assert keyid_of(load_private_key(tmp_path / "k")) == keyid_of(key)
    assert keyid_of(load_public_key(tmp_path / "p")) == keyid_of(key)


def test_missing_key_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"nope\.pub: cannot read key file"):
        load_public_key(tmp_path / "nope.pub")


def test_garbage_key_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"hello")
    with pytest.raises(BundleError, match="junk: not a PEM PKCS#8 private key"):
        load_private_key(path)
    with pytest.raises(BundleError, match="junk: not a PEM SubjectPublicKeyInfo public key"):
        load_public_key(path)


def test_private_key_passed_as_trust_key_gets_a_hint(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(private_key_pem(key))
    with pytest.raises(BundleError, match="looks like a private key: pass the .pub file"):
        load_public_key(path)


def test_non_ed25519_keys_are_rejected(tmp_path: Path) -> None:
    ec = generate_private_key(SECP256R1())
    private = tmp_path / "ec.key"
    private.write_bytes(
        ec.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "ec.pub"
    public.write_bytes(
        ec.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(BundleError, match="not Ed25519"):
        load_private_key(private)
    with pytest.raises(BundleError, match="not Ed25519"):
        load_public_key(public)


def test_encrypted_private_keys_are_rejected(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(BundleError, match="encrypted"):
        load_private_key(path)
