"""Releases: which bundle a mesh should run, signed by the control plane.

A release names a bundle by digest and carries a strictly increasing version and an
expiry (DESIGN.md: Bundle and release, Releases). Its payload is canonical JSON, signed
as a DSSE envelope:

    {"bundle": "sha256:…", "commit": "…", "expires_at": "2026-12-03T09:00:00Z",
     "issued_at": "2026-11-26T09:00:00Z", "mesh": "bookinfo", "previous": "sha256:…" | null,
     "version": 7}

`verify_release` applies the rules that concern the envelope alone: a trusted key signed
it, its version is newer than the applied one (the same version with the same digest is
a no-op), it has not expired and it is well formed. Fetching the bundle, checking its
digest and building the route table are the proxy's next steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from starmesh.bundle.canonical import encode_canonical, is_digest
from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, sign_envelope, verify_envelope
from starmesh.bundle.errors import BundleError, ReleaseRejected
from starmesh.bundle.keys import PrivateKey, PublicKey

__all__ = [
    "DEFAULT_TTL",
    "Release",
    "SignedRelease",
    "VerifiedRelease",
    "decode_release",
    "encode_release",
    "format_time",
    "issue_release",
    "parse_time",
    "sign_release",
    "verify_release",
]

DEFAULT_TTL = timedelta(days=7)
"""Releases expire after 7 days by default; the control plane re-issues at half life."""

_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


class Release(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The signed statement "mesh M runs bundle B as version N until T".

    Times are RFC 3339 UTC strings (`2026-11-26T09:00:00Z`). `previous` is the digest
    of the bundle this release replaces (null for the first). `commit` is the Git
    commit the bundle was compiled from (null outside Git).
    """

    mesh: str
    version: int
    bundle: str
    previous: str | None
    commit: str | None
    issued_at: str
    expires_at: str

    @property
    def issued(self) -> datetime:
        return parse_time(self.issued_at, "issued_at")

    @property
    def expires(self) -> datetime:
        return parse_time(self.expires_at, "expires_at")


@dataclass(frozen=True)
class SignedRelease:
    """A freshly issued release and its signed envelope (what the control plane serves)."""

    release: Release
    envelope: bytes


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose envelope passed every check.

    `unchanged` is True when it is the release already applied (same version, same
    bundle digest): nothing to do and nothing to report.
    """

    release: Release
    unchanged: bool = False


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with whole seconds: `2026-11-26T09:00:00Z`."""
    if moment.tzinfo is None:
        raise ValueError("format_time needs an aware datetime (e.g. datetime.now(UTC))")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, field: str = "time") -> datetime:
    """Parse an RFC 3339 UTC time (`...Z`); raise BundleError naming the field."""
    if not _TIME.match(text):
        raise BundleError(
            f"release {field} {text!r} is not an RFC 3339 UTC time like 2026-11-26T09:00:00Z"
        )
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise BundleError(f"release {field} {text!r} is not a valid time: {exc}") from exc


def encode_release(release: Release) -> bytes:
    """The release's canonical JSON payload bytes."""
    return encode_canonical(release)


def decode_release(payload: bytes) -> Release:
    """Decode and check a release payload; raise BundleError saying what is wrong."""
    try:
        release = msgspec.json.decode(payload, type=Release)
    except msgspec.ValidationError as exc:
        raise BundleError(f"invalid release: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BundleError(f"release payload is not valid JSON: {exc}") from exc
    _check_well_formed(release)
    return release


def sign_release(release: Release, key: PrivateKey) -> bytes:
    """Check `release` and sign its canonical payload; return the envelope bytes."""
    _check_well_formed(release)
    return sign_envelope(encode_release(release), key, payload_type=RELEASE_PAYLOAD_TYPE)


def issue_release(
    *,
    mesh: str,
    version: int,
    bundle: str,
    previous: str | None,
    commit: str | None,
    key: PrivateKey,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> SignedRelease:
    """Create and sign a release valid from `now` for `ttl` (7 days by default)."""
    if ttl <= timedelta(0):
        raise ValueError(f"release ttl must be positive, got {ttl}")
    release = Release(
        mesh=mesh,
        version=version,
        bundle=bundle,
        previous=previous,
        commit=commit,
        issued_at=format_time(now),
        expires_at=format_time(now + ttl),
    )
    return SignedRelease(release=release, envelope=sign_release(release, key))


def verify_release(
    envelope: bytes,
    trusted: Sequence[PublicKey],
    *,
    applied_version: int | None,
    applied_digest: str | None,
    now: datetime,
) -> VerifiedRelease:
    """Check a release envelope against what is applied; return it or raise.

    Raises SignatureError when no trusted key signed it or the envelope is malformed,
    BundleError when the payload is not a well-formed release, and ReleaseRejected when
    it is older than (or conflicts with) the applied release, or has expired. The same
    version with the same digest as the applied one comes back with `unchanged=True`.
    """
    if now.tzinfo is None:
        raise ValueError("verify_release needs an aware datetime (e.g. datetime.now(UTC))")
    release = decode_release(verify_envelope(envelope, trusted, payload_type=RELEASE_PAYLOAD_TYPE))
    if applied_version is not None:
        if release.version == applied_version:
            if release.bundle == applied_digest:
                return VerifiedRelease(release=release, unchanged=True)
            raise ReleaseRejected(
                f"release version {release.version} names bundle {release.bundle}, but "
                f"version {applied_version} is already applied with bundle {applied_digest}; "
                "a new bundle needs a new, higher version"
            )
        if release.version < applied_version:
            raise ReleaseRejected(
                f"release version {release.version} is older than the applied version "
                f"{applied_version}; roll back by issuing a new, higher version "
                "(`starmesh rollback`), never by re-sending an old release"
            )
    if release.expires <= now:
        raise ReleaseRejected(
            f"release version {release.version} expired at {release.expires_at} "
            f"(now {format_time(now)}); the control plane re-issues releases at half life, "
            "so check that it is running and that clocks agree"
        )
    return VerifiedRelease(release=release)


def _check_well_formed(release: Release) -> None:
    if not release.mesh:
        raise BundleError("release mesh name is empty")
    if type(release.version) is not int or release.version <= 0:
        raise BundleError(f"release version must be a positive integer, got {release.version}")
    if not is_digest(release.bundle):
        raise BundleError(
            f"release bundle {release.bundle!r} is not a digest like sha256:<64 lowercase hex>"
        )
    if release.previous is not None and not is_digest(release.previous):
        raise BundleError(
            f"release previous {release.previous!r} is not a digest like "
            "sha256:<64 lowercase hex> (or null)"
        )
    issued = parse_time(release.issued_at, "issued_at")
    expires = parse_time(release.expires_at, "expires_at")
    if expires <= issued:
        raise BundleError(
            f"release expires_at {release.expires_at} is not after issued_at {release.issued_at}"
        )
