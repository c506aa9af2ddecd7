"""Canonical bundle bytes and their digest.

Canonical JSON here means: object keys sorted, no insignificant whitespace, UTF-8 (not
ASCII-escaped), integers as integers, floats in shortest round-trip form. The same
value always encodes to the same bytes, on any machine; a bundle's identity is
`sha256:<hex>` of those bytes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from starmesh.bundle.errors import BundleError
from starmesh.bundle.spec import Spec

__all__ = [
    "API_VERSION",
    "Bundle",
    "BundleSource",
    "decode_bundle",
    "digest_of",
    "encode_bundle",
    "encode_canonical",
    "is_digest",
]

API_VERSION = "starmesh/v1"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

_encoder = msgspec.json.Encoder(order="sorted")


class BundleSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the bundle came from: the Git commit (null outside Git) and the entry file."""

    commit: str | None
    path: str


class Bundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, rename="camel"):
    """An immutable, content-addressed config bundle (DESIGN.md: Bundle and release)."""

    api_version: str = API_VERSION
    kind: str = "Bundle"
    source: BundleSource
    spec: Spec


def encode_canonical(value: Any) -> bytes:
    """Canonical JSON bytes of any msgspec-encodable value."""
    return _encoder.encode(value)


def digest_of(data: bytes) -> str:
    """The content address of some bytes: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(text: str) -> bool:
    """True for a well-formed `sha256:<64 lowercase hex>` digest."""
    return bool(_DIGEST.match(text))


def encode_bundle(bundle: Bundle) -> tuple[bytes, str]:
    """The bundle's canonical bytes and digest."""
    data = encode_canonical(bundle)
    return data, digest_of(data)


def decode_bundle(data: bytes, expected_digest: str | None = None) -> Bundle:
    """Decode and check a bundle; raise BundleError saying what is wrong.

    When `expected_digest` is given the bytes must hash to it. The bytes must also be
    canonical: a bundle that re-encodes differently was not made by a starmesh compiler.
    """
    if expected_digest is not None:
        actual = digest_of(data)
        if actual != expected_digest:
            raise BundleError(f"bundle digest mismatch: expected {expected_digest}, got {actual}")
    try:
        bundle = msgspec.json.decode(data, type=Bundle)
    except msgspec.ValidationError as exc:
        raise BundleError(f"invalid bundle: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BundleError(f"bundle is not valid JSON: {exc}") from exc
    if bundle.api_version != API_VERSION or bundle.kind != "Bundle":
        raise BundleError(
            f"unsupported bundle: apiVersion {bundle.api_version!r} kind {bundle.kind!r} "
            f"(this starmesh reads {API_VERSION} Bundle)"
        )
    if encode_canonical(bundle) != data:
        raise BundleError("bundle bytes are not canonical (re-encoding differs)")
    return bundle
