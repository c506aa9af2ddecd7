"""DSSE envelopes signed with Ed25519 (https://github.com/secure-systems-lab/dsse).

An envelope is JSON:

    {"payloadType": "application/vnd.starmesh.release+json",
     "payload": "<base64 of the payload bytes>",
     "signatures": [{"keyid": "<hex sha256 of the raw public key>", "sig": "<base64>"}]}

Each signature covers PAE(payloadType, payload), the pre-authentication encoding
`DSSEv1 <len(type)> <type> <len(payload)> <payload>` (lengths in ASCII decimal bytes),
so the type cannot be swapped without breaking the signature. A `keyid` is only a hint:
verification tries every trusted key against every signature.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import msgspec
from cryptography.exceptions import InvalidSignature

from starmesh.bundle.errors import SignatureError
from starmesh.bundle.keys import PrivateKey, PublicKey, keyid_of

__all__ = [
    "Envelope",
    "EnvelopeSignature",
    "MAX_ENVELOPE_BYTES",
    "MAX_SIGNATURES",
    "RELEASE_PAYLOAD_TYPE",
    "pae",
    "sign_envelope",
    "verify_envelope",
]

RELEASE_PAYLOAD_TYPE = "application/vnd.starmesh.release+json"
MAX_ENVELOPE_BYTES = 1024 * 1024
"""An envelope larger than this is refused before it is parsed."""
MAX_SIGNATURES = 16
"""An envelope with more signatures than this is refused (bounds verification work)."""


class EnvelopeSignature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One signature: which key (a hint) and the base64 Ed25519 signature over PAE."""

    sig: str
    keyid: str = ""


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A DSSE envelope as it travels (base64 fields still encoded)."""

    payload_type: str
    payload: str
    signatures: tuple[EnvelopeSignature, ...]


_encoder = msgspec.json.Encoder(order="sorted")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what a signature actually covers."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(
    payload: bytes, key: PrivateKey, *, payload_type: str = RELEASE_PAYLOAD_TYPE
) -> bytes:
    """Sign `payload` with `key`; return the envelope's JSON bytes."""
    signature = key.sign(pae(payload_type, payload))
    envelope = Envelope(
        payload_type=payload_type,
        payload=base64.b64encode(payload).decode("ascii"),
        signatures=(
            EnvelopeSignature(
                keyid=keyid_of(key), sig=base64.b64encode(signature).decode("ascii")
            ),
        ),
    )
    return _encoder.encode(envelope)


def verify_envelope(
    data: bytes,
    trusted: Sequence[PublicKey],
    *,
    payload_type: str = RELEASE_PAYLOAD_TYPE,
) -> bytes:
    """Return the payload if a trusted key signed it; raise SignatureError otherwise.

    Any one valid signature by any trusted key suffices (several keys are trusted while
    a signing key is rotated). Signatures by unknown keys are ignored, not fatal.
    """
    if not trusted:
        raise SignatureError("no trusted keys given: pass at least one public key (--trust FILE)")
    envelope = _parse(data)
    if envelope.payload_type != payload_type:
        raise SignatureError(
            f"envelope payloadType is {envelope.payload_type!r}, expected {payload_type!r}"
        )
    payload = _b64decode(envelope.payload, "payload")
    message = pae(envelope.payload_type, payload)
    keyids = []
    for index, signature in enumerate(envelope.signatures):
        raw = _b64decode(signature.sig, f"signatures[{index}].sig")
        keyids.append(signature.keyid or "(no keyid)")
        for key in trusted:
            try:
                key.verify(raw, message)
            except InvalidSignature:
                continue
            return payload
    trusted_ids = ", ".join(keyid_of(key)[:16] for key in trusted)
    signed_ids = ", ".join(keyid[:16] for keyid in keyids)
    raise SignatureError(
        f"no valid signature by a trusted key (signed by: {signed_ids}; trusted: "
        f"{trusted_ids}); check that --trust names the control plane's signing.pub"
    )


def _parse(data: bytes) -> Envelope:
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SignatureError(
            f"envelope is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit"
        )
    try:
        envelope = msgspec.json.decode(data, type=Envelope)
    except msgspec.ValidationError as exc:
        raise SignatureError(f"malformed DSSE envelope: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise SignatureError(f"envelope is not valid JSON: {exc}") from exc
    if not envelope.signatures:
        raise SignatureError("envelope has no signatures")
    if len(envelope.signatures) > MAX_SIGNATURES:
        raise SignatureError(
            f"envelope has {len(envelope.signatures)} signatures, over the limit of "
            f"{MAX_SIGNATURES}"
        )
    return envelope


def _b64decode(text: str, field: str) -> bytes:
    """Decode standard or URL-safe base64 (DSSE allows both), padding required."""
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"envelope {field} is not valid base64: {exc}") from exc
