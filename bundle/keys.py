"""Release signing keys: Ed25519, stored as PEM files.

A private key file is PEM PKCS#8 (`signing.key`, mode 0600); a public key file is PEM
SubjectPublicKeyInfo (`signing.pub`). A key's id is the hex sha256 of its raw 32-byte
public key (DESIGN.md: Releases), the same `keyid` a DSSE signature carries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from starmesh.bundle.errors import BundleError
from starmesh.bundle.files import read_bounded, write_new_file

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "PrivateKey",
    "PublicKey",
    "generate_keypair",
    "keyid_of",
    "load_private_key",
    "load_public_key",
    "parse_private_key",
    "parse_public_key",
    "private_key_pem",
    "public_key_pem",
]

PrivateKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"

_MAX_KEY_FILE_BYTES = 64 * 1024


def keyid_of(key: PublicKey | PrivateKey) -> str:
    """The key's id: hex sha256 of the raw 32-byte Ed25519 public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def private_key_pem(key: PrivateKey) -> bytes:
    """The private key as unencrypted PEM PKCS#8."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: PublicKey) -> bytes:
    """The public key as PEM SubjectPublicKeyInfo."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write a new `signing.key` (mode 0600) and `signing.pub` into `out_dir`.

    Creates `out_dir` if needed and refuses to overwrite an existing key, since that
    would silently lose the key proxies trust. Returns (private path, public path).
    """
    out_dir = Path(out_dir)
    private_path = out_dir / PRIVATE_KEY_FILE
    public_path = out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(
                f"{path}: already exists; remove it or choose another output directory "
                "(overwriting a signing key would break every proxy that trusts it)"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"{out_dir}: cannot create key directory: {exc.strerror}") from exc
    key = Ed25519PrivateKey.generate()
    _write_new_file(private_path, private_key_pem(key), mode=0o600)
    _write_new_file(public_path, public_key_pem(key.public_key()), mode=0o644)
    return private_path, public_path


def load_private_key(path: Path) -> PrivateKey:
    """Read an Ed25519 private key from a PEM PKCS#8 file."""
    return parse_private_key(_read_key_file(path), where=str(path))


def load_public_key(path: Path) -> PublicKey:
    """Read an Ed25519 public key from a PEM SubjectPublicKeyInfo file."""
    return parse_public_key(_read_key_file(path), where=str(path))


def parse_private_key(data: bytes, *, where: str = "private key") -> PrivateKey:
    """Parse PEM PKCS#8 bytes into an Ed25519 private key; `where` names the source."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise BundleError(
            f"{where}: the private key is encrypted; starmesh needs an unencrypted "
            "PEM PKCS#8 key (create one with `starmesh keygen --out DIR`)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            f"{where}: not a PEM PKCS#8 private key "
            "(create one with `starmesh keygen --out DIR`)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(
            f"{where}: the private key is {type(key).__name__}, not Ed25519 "
            "(create one with `starmesh keygen --out DIR`)"
        )
    return key


def parse_public_key(data: bytes, *, where: str = "public key") -> PublicKey:
    """Parse PEM SubjectPublicKeyInfo bytes into an Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        hint = (
            " (this looks like a private key: pass the .pub file)"
            if b"PRIVATE KEY" in data
            else ""
        )
        raise BundleError(
            f"{where}: not a PEM SubjectPublicKeyInfo public key{hint}"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{where}: the public key is {type(key).__name__}, not Ed25519")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        data = read_bounded(path, _MAX_KEY_FILE_BYTES)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read key file: {exc.strerror}") from exc
    if data is None:
        raise BundleError(f"{path}: too large for a key file (over {_MAX_KEY_FILE_BYTES} bytes)")
    return data


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    try:
        write_new_file(path, data, mode=mode)
    except OSError as exc:
        raise BundleError(f"{path}: cannot create key file: {exc.strerror}") from exc
