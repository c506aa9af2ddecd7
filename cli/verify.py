"""`starmesh verify`: check a signed release envelope the way a proxy would, offline.

    ENVELOPE ──read (≤ 1 MiB)──► signature by a --key ──► payload is a release ──► not expired
                                                                                    │ --bundle FILE
                                                                                    ▼
                                                           sha256 of FILE == release.bundle

The checks are `bundle/release.verify_release`'s (with no applied release, so every
version is acceptable) followed, with `--bundle`, by hashing the bundle file (streamed:
any size, constant memory) against the digest the release names. The first failing
check decides the outcome, and it is named precisely:

    envelope          not a DSSE envelope (not JSON, missing fields, bad base64, too big)
    payload type      a DSSE envelope, but not a starmesh release
    unknown key       signed, but by none of the keys given (the keyids are listed)
    bad signature     the signature's keyid is one of the keys given, yet it does not verify:
                      the envelope was altered after signing, or is corrupt
    payload           signed, but the payload is not a well-formed release
    expired           the release's expires_at has passed
    digest mismatch   the bundle file hashes to something else than the release names

Exit 0 verified, 1 a check failed, 2 bad usage or a file that cannot be read (a missing
envelope, a key file that is not an Ed25519 public key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from starmesh.cli.console import Consoles
from starmesh.cli.errors import InputError
from starmesh.cli.options import format_option, load_public_keys

if TYPE_CHECKING:
    from starmesh.bundle.keys import PublicKey
    from starmesh.bundle.release import Release

__all__ = ["Verification", "verify_command", "verify_envelope_file"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Verification:
    """The outcome of verifying one envelope (and optionally a bundle file against it).

    `failure` is None when every check passed, else (check, message) for the first one
    that failed; `release` is set once the signature verified; `keyid` is the key that
    signed it; `bundle_digest` is the bundle file's digest when one was given.
    """

    failure: tuple[str, str] | None
    release: Release | None = None
    keyid: str | None = None
    bundle_digest: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _read(path: Path, what: str, *, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `path` (the caller judges size); InputError when unreadable."""
    try:
        with open(path, "rb") as file:
            return file.read(limit + 1)
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _file_digest(path: Path) -> str:
    """`sha256:<hex>` of the file at `path`, streamed; InputError when unreadable."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except IsADirectoryError:
        raise InputError(f"--bundle {path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read --bundle {path}: {exc.strerror or exc}") from exc
    return "sha256:" + digest.hexdigest()


def _signature_failure(data: bytes, keys: list[PublicKey], exc: Exception) -> tuple[str, str]:
    """Name a SignatureError precisely: envelope, payload type, unknown key or bad signature."""
    import msgspec

    from starmesh.bundle.dsse import MAX_ENVELOPE_BYTES, RELEASE_PAYLOAD_TYPE, Envelope
    from starmesh.bundle.keys import keyid_of

    if len(data) > MAX_ENVELOPE_BYTES:
        return ("envelope", str(exc))
    try:
        envelope = msgspec.json.decode(data, type=Envelope)
    except msgspec.MsgspecError:
        return ("envelope", str(exc))
    if envelope.payload_type != RELEASE_PAYLOAD_TYPE:
        return (
            "payload type",
            f"payloadType is {envelope.payload_type!r}, not a starmesh release ({RELEASE_PAYLOAD_TYPE!r})",
        )
    given = {keyid_of(key) for key in keys}
    signed = [signature.keyid for signature in envelope.signatures]
    known = [keyid for keyid in signed if keyid in given]
    if known:
        return (
            "bad signature",
            f"the signature by key {known[0]} does not verify: the envelope was altered after "
            "signing or is corrupt; fetch it again from the control plane",
        )
    if not signed:
        return ("envelope", str(exc))
    return (
        "unknown key",
        f"signed by key {', '.join(k or '(no keyid)' for k in signed)}, which is none of the keys "
        f"given ({', '.join(sorted(given))}); pass the signing.pub of the control plane that issued it",
    )


def verify_envelope_file(
    data: bytes, keys: list[PublicKey], *, bundle: Path | None, now: datetime
) -> Verification:
    """Run every check on the envelope bytes `data` (and the bundle file, if given)."""
    from starmesh.bundle.dsse import verify_envelope
    from starmesh.bundle.errors import BundleError, ReleaseRejected, SignatureError
    from starmesh.bundle.release import decode_release, verify_release

    try:
        release = verify_release(data, keys, applied_version=None, applied_digest=None, now=now).release
    except SignatureError as exc:
        return Verification(failure=_signature_failure(data, keys, exc))
    except ReleaseRejected as exc:  # with no applied version, only expiry rejects
        signed = decode_release(verify_envelope(data, keys))
        return Verification(failure=("expired", str(exc)), release=signed, keyid=_signer(data, keys))
    except BundleError as exc:
        return Verification(failure=("payload", str(exc)), keyid=_signer(data, keys))
    keyid = _signer(data, keys)
    if bundle is None:
        return Verification(failure=None, release=release, keyid=keyid)
    got = _file_digest(bundle)
    if got != release.bundle:
        message = f"bundle file {bundle} is not the bundle release {release.version} names: expected {release.bundle}, got {got}"
        return Verification(failure=("digest mismatch", message), release=release, keyid=keyid, bundle_digest=got)
    return Verification(failure=None, release=release, keyid=keyid, bundle_digest=got)


def _signer(data: bytes, keys: list[PublicKey]) -> str | None:
    """The id of the first given key whose signature on `data` verifies."""
    from starmesh.bundle.dsse import verify_envelope
    from starmesh.bundle.errors import SignatureError
    from starmesh.bundle.keys import keyid_of

    for key in keys:
        try:
            verify_envelope(data, [key])
        except SignatureError:
            continue
        return keyid_of(key)
    return None


def _to_json(outcome: Verification, bundle: Path | None) -> str:
    import msgspec

    release = outcome.release
    document: dict[str, object] = {
        "verified": outcome.ok,
        "failure": None if outcome.failure is None else {"check": outcome.failure[0], "message": outcome.failure[1]},
        "release": None if release is None else msgspec.to_builtins(release),
        "keyid": outcome.keyid,
        "bundle_file": None
        if bundle is None or outcome.bundle_digest is None
        else {
            "path": str(bundle),
            "digest": outcome.bundle_digest,
            "matches": release is not None and outcome.bundle_digest == release.bundle,
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def _render_text(consoles: Consoles, outcome: Verification, bundle: Path | None) -> None:
    release = outcome.release
    if outcome.failure is not None or release is None:
        check, message = outcome.failure or ("envelope", "no release")
        consoles.err.print(f"starmesh: verification failed: {check}: {message}")
        return
    matches = f"  (matches {bundle})" if bundle is not None else ""
    rows = [
        ("bundle", release.bundle + matches),
        ("commit", release.commit or "none (built outside Git)"),
        ("previous", release.previous or "none (the first release)"),
        ("issued", release.issued_at),
        ("expires", release.expires_at),
        ("keyid", outcome.keyid or "?"),
    ]
    consoles.out.print(f"verified: release {release.version} of mesh {release.mesh}")
    for name, value in rows:
        consoles.out.print(f"  {name:<9} {value}")


@click.command("verify")
@click.argument("envelope", type=click.Path(path_type=Path), metavar="ENVELOPE")
@click.option(
    "--key",
    "key_files",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="A trusted public key (signing.pub); give it more than once during a key rotation.",
)
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Also check that this bundle file hashes to the digest the release names.",
)
@format_option("text for people, json for tools (printed on stdout whatever the outcome).")
@click.pass_context
def verify_command(
    ctx: click.Context, envelope: Path, key_files: tuple[Path, ...], bundle: Path | None, output_format: str
) -> None:
    """Verify a signed release ENVELOPE (a DSSE envelope, as GET /v1/release serves it).

    Checks that one of the --key public keys signed it, that its payload is a starmesh
    release and that it has not expired; with --bundle, that the bundle file hashes to
    the release's digest. Exit status: 0 verified, 1 a check failed (the message names
    it: bad signature, unknown key, expired, digest mismatch, ...), 2 bad usage or a file
    that cannot be read.

    \b
    Examples:
      curl -s "http://127.0.0.1:8080/v1/release?after=0&wait=0" > release.json
      starmesh verify release.json --key keys/signing.pub
      starmesh verify release.json --key old.pub --key new.pub --bundle bundle.json
      starmesh verify release.json --key keys/signing.pub --format json | jq .release.version
    """
    from starmesh.bundle.dsse import MAX_ENVELOPE_BYTES

    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    data = _read(envelope, "envelope", limit=MAX_ENVELOPE_BYTES)
    keys = list(load_public_keys(key_files, where="--key"))
    if bundle is not None and not bundle.is_file():
        raise InputError(f"--bundle {bundle}: no such file")
    outcome = verify_envelope_file(data, keys, bundle=bundle, now=datetime.now(UTC))
    if output_format == "json":
        click.echo(_to_json(outcome, bundle))
    else:
        _render_text(consoles, outcome, bundle)
    ctx.exit(0 if outcome.ok else 1)
