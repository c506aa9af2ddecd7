"""Releases: issuing, signing and the envelope-level rules a proxy applies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from starmesh.bundle.dsse import sign_envelope
from starmesh.bundle.errors import BundleError, ReleaseRejected, SignatureError
from starmesh.bundle.release import (
    DEFAULT_TTL,
    Release,
    decode_release,
    encode_release,
    format_time,
    issue_release,
    parse_time,
    sign_release,
    verify_release,
)

NOW = datetime(2026, 11, 26, 9, 0, 0, tzinfo=UTC)
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _issue(key: Ed25519PrivateKey, version: int = 3, bundle: str = DIGEST_A) -> bytes:
    return issue_release(
        mesh="bookinfo",
        version=version,
        bundle=bundle,
        previous=DIGEST_B,
        commit="0123abcd",
        key=key,
        now=NOW,
    ).envelope


def _verify(
    envelope: bytes,
    key: Ed25519PrivateKey,
    *,
    applied_version: int | None = None,
    applied_digest: str | None = None,
    now: datetime = NOW,
) -> Release:
    result = verify_release(
        envelope,
        [key.public_key()],
        applied_version=applied_version,
        applied_digest=applied_digest,
        now=now,
    )
    assert not result.unchanged
    return result.release


def _payload(**fields: object) -> bytes:
    document: dict[str, object] = {
        "mesh": "bookinfo",
        "version": 1,
        "bundle": DIGEST_A,
        "previous": None,
        "commit": None,
        "issued_at": "2026-11-26T09:00:00Z",
        "expires_at": "2026-12-03T09:00:00Z",
    }
    document.update(fields)
    return json.dumps({k: v for k, v in document.items() if v != "<absent>"}).encode()


# --- issuing -------------------------------------------------------------------------


def test_issue_and_verify_round_trip(key: Ed25519PrivateKey) -> None:
    signed = issue_release(
        mesh="bookinfo",
        version=1,
        bundle=DIGEST_A,
        previous=None,
        commit=None,
        key=key,
        now=NOW,
    )
    release = _verify(signed.envelope, key)
    assert release == signed.release
    assert release.version == 1
    assert release.previous is None
    assert release.issued_at == "2026-11-26T09:00:00Z"


def test_default_expiry_is_seven_days(key: Ed25519PrivateKey) -> None:
    release = _verify(_issue(key), key)
    assert DEFAULT_TTL == timedelta(days=7)
    assert release.expires_at == "2026-12-03T09:00:00Z"
    assert release.expires - release.issued == timedelta(days=7)


def test_payload_is_canonical_json(key: Ed25519PrivateKey) -> None:
    signed = issue_release(
        mesh="bookinfo",
        version=2,
        bundle=DIGEST_A,
        previous=DIGEST_B,
        commit="c0ffee",
        key=key,
        now=NOW,
        ttl=timedelta(hours=1),
    )
    payload = encode_release(signed.release)
    assert payload == (
        b'{"bundle":"%s","commit":"c0ffee","expires_at":"2026-11-26T10:00:00Z",'
        b'"issued_at":"2026-11-26T09:00:00Z","mesh":"bookinfo","previous":"%s","version":2}'
        % (DIGEST_A.encode(), DIGEST_B.encode())
    )
    assert decode_release(payload) == signed.release


def test_times_are_utc_whatever_the_input_zone() -> None:
    from datetime import timezone

    local = datetime(2026, 11, 26, 10, 30, 15, 999, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(local) == "2026-11-26T09:30:15Z"
    assert parse_time("2026-11-26T09:30:15Z") == datetime(2026, 11, 26, 9, 30, 15, tzinfo=UTC)
    with pytest.raises(ValueError, match="aware datetime"):
        format_time(datetime(2026, 11, 26))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": 0}, "version must be a positive integer, got 0"),
        ({"bundle": "sha256:abc"}, "bundle 'sha256:abc' is not a digest"),
        ({"previous": "md5:" + "a" * 32}, "previous 'md5:"),
        ({"mesh": ""}, "mesh name is empty"),
    ],
)
def test_issue_refuses_malformed_releases(
    key: Ed25519PrivateKey, fields: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {
        "mesh": "bookinfo",
        "version": 1,
        "bundle": DIGEST_A,
        "previous": None,
        "commit": None,
    }
    arguments.update(fields)
    with pytest.raises(BundleError, match=message):
        issue_release(key=key, now=NOW, **arguments)  # type: ignore[arg-type]


def test_issue_refuses_a_non_positive_ttl(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="ttl must be positive"):
        issue_release(
            mesh="m", version=1, bundle=DIGEST_A, previous=None, commit=None,
            key=key, now=NOW, ttl=timedelta(0),
        )  # fmt: skip


# --- the proxy's rules ---------------------------------------------------------------


def test_first_release_is_accepted_with_nothing_applied(key: Ed25519PrivateKey) -> None:
    assert _verify(_issue(key, version=1), key).version == 1


def test_newer_version_is_accepted(key: Ed25519PrivateKey) -> None:
    release = _verify(_issue(key, version=4), key, applied_version=3, applied_digest=DIGEST_B)
    assert release.version == 4


def test_a_newer_version_may_name_an_older_bundle(key: Ed25519PrivateKey) -> None:
    # Rolling back is a new, higher version whose bundle is an older one.
    release = _verify(
        _issue(key, version=5, bundle=DIGEST_B), key, applied_version=4, applied_digest=DIGEST_A
    )
    assert release.bundle == DIGEST_B


def test_same_version_same_digest_is_a_no_op(key: Ed25519PrivateKey) -> None:
    result = verify_release(
        _issue(key, version=3, bundle=DIGEST_A),
        [key.public_key()],
        applied_version=3,
        applied_digest=DIGEST_A,
        now=NOW,
    )
    assert result.unchanged
    assert result.release.version == 3


def test_same_version_other_digest_is_rejected(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ReleaseRejected, match="version 3 is already applied with bundle"):
        _verify(_issue(key, version=3, bundle=DIGEST_A), key, applied_version=3,
                applied_digest=DIGEST_B)  # fmt: skip


def test_stale_version_is_rejected(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ReleaseRejected, match="older than the applied version 3.*rollback"):
        _verify(_issue(key, version=2), key, applied_version=3, applied_digest=DIGEST_A)


def test_expired_release_is_rejected(key: Ed25519PrivateKey) -> None:
    envelope = _issue(key)
    assert _verify(envelope, key, now=NOW + DEFAULT_TTL - timedelta(seconds=1))
    with pytest.raises(ReleaseRejected, match="expired at 2026-12-03T09:00:00Z"):
        _verify(envelope, key, now=NOW + DEFAULT_TTL)


def test_verify_needs_an_aware_clock(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        _verify(_issue(key), key, now=datetime(2026, 11, 26))


def test_untrusted_signer_is_rejected_before_anything_else(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="no valid signature by a trusted key"):
        _verify(_issue(other, version=9), key, applied_version=3, applied_digest=DIGEST_A)


def test_rotation_accepts_either_key(key: Ed25519PrivateKey) -> None:
    new = Ed25519PrivateKey.generate()
    trusted = [key.public_key(), new.public_key()]
    for signer in (key, new):
        result = verify_release(
            _issue(signer), trusted, applied_version=None, applied_digest=None, now=NOW
        )
        assert result.release.version == 3


def test_tampered_release_is_rejected(key: Ed25519PrivateKey) -> None:
    import base64

    document = json.loads(_issue(key, version=3))
    payload = json.loads(base64.b64decode(document["payload"]))
    payload["version"] = 99
    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(SignatureError, match="no valid signature"):
        _verify(json.dumps(document).encode(), key)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "release payload is not valid JSON"),
        (_payload(version="<absent>"), "missing required field `version`"),
        (_payload(version=True), r"Expected `int`, got `bool` - at `\$.version`"),
        (_payload(version=-1), "version must be a positive integer, got -1"),
        (_payload(bundle="sha256:XYZ"), "bundle 'sha256:XYZ' is not a digest"),
        (_payload(expires_at="next week"), "expires_at 'next week' is not an RFC 3339 UTC time"),
        (_payload(issued_at="2026-11-26T09:00:00+01:00"), "issued_at .* not an RFC 3339 UTC"),
        (_payload(issued_at="2026-13-45T09:00:00Z"), "issued_at .* is not a valid time"),
        (
            _payload(expires_at="2026-11-26T08:00:00Z"),
            "expires_at 2026-11-26T08:00:00Z is not after issued_at",
        ),
        (_payload(extra=1), "unknown field `extra`"),
    ],
)
def test_malformed_payloads_are_rejected_clearly(
    key: Ed25519PrivateKey, payload: bytes, message: str
) -> None:
    envelope = sign_envelope(payload, key)
    with pytest.raises(BundleError, match=message) as info:
        _verify(envelope, key)
    assert not isinstance(info.value, ReleaseRejected)


def test_sign_release_round_trip(key: Ed25519PrivateKey) -> None:
    release = decode_release(_payload())
    assert _verify(sign_release(release, key), key) == release
