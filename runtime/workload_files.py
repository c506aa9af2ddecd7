"""The workload certificate's files in the state dir: written atomically, read back checked.

    STATE_DIR/workload.key        PEM PKCS#8 private key         0600
    STATE_DIR/workload.crt        PEM certificate                0600
    STATE_DIR/workload.key.next   only between the two writes of a rotation

Every write is atomic (temp file, fsync, rename: bundle/files.py). Two files cannot be
replaced in one step, so `save` writes the new key aside (`workload.key.next`), replaces
the certificate, then renames the key into place. A crash between the steps leaves a
certificate that matches `workload.key` (the old pair) or `workload.key.next` (the new
one); `load` takes whichever matches, and finishes the rename. What `load` returns is
checked as an answer from the control plane is (workload_cert.accept), counting its
lifetime from its notBefore.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from starmesh.bundle.files import fsync_directory, write_atomically
from starmesh.runtime.errors import WorkloadError
from starmesh.runtime.workload_cert import Credential, accept

__all__ = ["CERT_FILE", "KEY_FILE", "NEXT_KEY_FILE", "load", "save"]

KEY_FILE = "workload.key"
CERT_FILE = "workload.crt"
NEXT_KEY_FILE = "workload.key.next"
_MAX_FILE_BYTES = 256 * 1024


def save(state_dir: Path, credential: Credential) -> None:
    """Persist key and certificate (0600), crash-safe as the module docstring says; OSError."""
    write_atomically(state_dir / NEXT_KEY_FILE, credential.key_pem, mode=0o600)
    write_atomically(state_dir / CERT_FILE, credential.cert_pem, mode=0o600)
    os.replace(state_dir / NEXT_KEY_FILE, state_dir / KEY_FILE)
    fsync_directory(state_dir)


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_FILE_BYTES:
        raise WorkloadError(f"{path}: over {_MAX_FILE_BYTES} bytes, not a key or certificate file")
    return data


def _private_key(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise WorkloadError(f"{path}: not an unencrypted PEM private key: {exc}") from exc


def load(
    state_dir: Path, roots: tuple[x509.Certificate, ...], *, service: str, now: datetime
) -> tuple[Credential | None, str]:
    """The credential kept in `state_dir`, checked as `accept` checks an answer, or (None, why not)."""
    cert_path = state_dir / CERT_FILE
    try:
        cert_pem = _read(cert_path)
        if cert_pem is None:
            return None, f"no {CERT_FILE} in {state_dir}"
        candidates = [state_dir / KEY_FILE, state_dir / NEXT_KEY_FILE]
        found = [(path, data) for path in candidates if (data := _read(path)) is not None]
        if not found:
            return None, f"{cert_path} has no {KEY_FILE} beside it"
        last = ""
        for path, data in found:
            try:
                credential = accept(
                    _private_key(path, data), cert_pem, roots, service=service, trust_domain=None, now=now
                )
            except WorkloadError as exc:
                last = f"{cert_path} with {path.name}: {exc}"
                continue
            if path.name == NEXT_KEY_FILE:  # a rotation cut short after the certificate: finish it
                os.replace(path, state_dir / KEY_FILE)
                fsync_directory(state_dir)
            return credential, ""
        return None, last
    except OSError as exc:
        return None, f"cannot read the workload certificate in {state_dir}: {exc.strerror or exc}"
    except WorkloadError as exc:
        return None, str(exc)
