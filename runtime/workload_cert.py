"""One workload credential: the proxy's private key and the X.509-SVID issued for it.

    new_request(trust_domain, service)  ─► (key, CSR PEM)     ECDSA P-256, one URI SAN
                                                               spiffe://<td>/service/<service>
    accept(key, cert PEM, roots, ...)   ─► Credential         the answer, checked before use
    contexts(credential, roots)         ─► Contexts            server / client / control plane

A certificate is used only after `verify_svid` accepted it against the mesh roots
(`--ca-cert`) for both usages, it names this proxy's service, and it carries the public
half of this proxy's own key. That holds for an answer from the control plane and for
the files read back at start (workload_files.py) alike.

Lifetime. The CA backdates notBefore by a minute for clock skew, so a certificate's
lifetime counts from when the proxy received it (`issued_at`); one read back from disk
counts from its notBefore, which renews a little early, never late:

    issued_at ──────────── renew_at (half) ───── warn_at (¾) ────── not_after
                                 │ renewal starts      │ "expiring": warning + gauge

The files in the state dir (save, load): workload_files.py.

`ssl` loads a certificate and key from files only: `contexts` writes them to a 0600
temp file in the state dir and removes it at once.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.identity import (
    SPIFFE_SCHEME,
    check_trust_domain,
    load_certificates,
    parse_spiffe_id,
    spiffe_id,
    verify_svid,
)
from starmesh.runtime.errors import WorkloadError

__all__ = [
    "Contexts",
    "Credential",
    "accept",
    "contexts",
    "control_plane_context",
    "new_request",
    "root_trust_domain",
]


@dataclass(frozen=True, slots=True)
class Credential:
    """A private key and the checked X.509-SVID issued for it (PEM both), with its times."""

    key_pem: bytes
    cert_pem: bytes
    spiffe_id: str
    trust_domain: str
    service: str
    issued_at: datetime
    """When the proxy received it (read back from disk: its notBefore); the lifetime counts from here."""
    not_after: datetime

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.issued_at

    @property
    def renew_at(self) -> datetime:
        """Half-life: renewal starts here."""
        return self.issued_at + self.lifetime / 2

    @property
    def warn_at(self) -> datetime:
        """A quarter of the lifetime left: from here, not renewed yet is worth a warning."""
        return self.not_after - self.lifetime / 4


@dataclass(frozen=True, slots=True)
class Contexts:
    """The TLS contexts built from one credential (rebuilt whole on rotation).

    `server`/`client`: the data plane's (TLS 1.2+, only the mesh roots, CERT_REQUIRED,
    `check_hostname=False`: identity is the SVID, checked with `verify_svid`);
    `control_plane`: the HTTPS client's, which also checks the control plane's host name."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    control_plane: ssl.SSLContext


def new_request(trust_domain: str, service: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh ECDSA P-256 key and a CSR (PEM) asking for exactly spiffe://<td>/service/<service>."""
    key = ec.generate_private_key(ec.SECP256R1())
    uri = x509.UniformResourceIdentifier(spiffe_id(trust_domain, service))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))  # identity lives in the URI SAN; the subject is never read
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def root_trust_domain(roots: tuple[x509.Certificate, ...]) -> str | None:
    """The trust domain a mesh root names as its `spiffe://<td>` URI SAN (`starmesh ca init`'s), if one does."""
    for root in roots:
        try:
            sans = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(SPIFFE_SCHEME):
                try:
                    return check_trust_domain(uri.removeprefix(SPIFFE_SCHEME))
                except IdentityError:
                    continue
    return None


def _key_pem(key: PrivateKeyTypes) -> bytes:
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, none)


def _spki(public_key: object) -> bytes:
    assert hasattr(public_key, "public_bytes")
    der: bytes = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def accept(
    key: PrivateKeyTypes,
    cert_pem: bytes,
    roots: tuple[x509.Certificate, ...],
    *,
    service: str,
    trust_domain: str | None,
    now: datetime,
    issued_at: datetime | None = None,
) -> Credential:
    """`cert_pem` as this proxy's credential, if it is one: WorkloadError saying why not.

    Checked: an X.509-SVID of `trust_domain` (None: the one it names) chaining to `roots`,
    valid at `now`, good as client and server, naming `service`, for `key`. `issued_at`:
    when it arrived (None: read back from disk, its notBefore counts)."""
    try:
        leaf = load_certificates(cert_pem)[0]
        if trust_domain is None:
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier
            )
            trust_domain = parse_spiffe_id(uris[0])[0] if len(uris) == 1 else ""
        der = leaf.public_bytes(serialization.Encoding.DER)
        for usage in ("client", "server"):
            named = verify_svid([der], roots, trust_domain=trust_domain, now=now, usage=usage)
    except (IdentityError, x509.ExtensionNotFound) as exc:
        raise WorkloadError(f"the certificate is not a usable X.509-SVID of this mesh: {exc}") from exc
    if named != service:
        raise WorkloadError(f"the certificate names service {named!r}, not {service!r}")
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise WorkloadError("the certificate is not for this proxy's key (its public key differs)")
    return Credential(
        key_pem=_key_pem(key),
        cert_pem=leaf.public_bytes(serialization.Encoding.PEM),
        spiffe_id=spiffe_id(trust_domain, service),
        trust_domain=trust_domain,
        service=service,
        issued_at=leaf.not_valid_before_utc
        if issued_at is None
        else max(leaf.not_valid_before_utc, min(issued_at, leaf.not_valid_after_utc)),
        not_after=leaf.not_valid_after_utc,
    )


# -- TLS contexts ------------------------------------------------------------------------


def _base(purpose: ssl._SSLMethod, roots_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=roots_pem)  # only the mesh roots: no system store
    return context


def _load_chain(contexts: tuple[ssl.SSLContext, ...], credential: Credential, scratch: Path) -> None:
    fd, name = tempfile.mkstemp(dir=scratch, prefix=".starmesh-tls-", suffix=".pem")  # 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(credential.cert_pem + credential.key_pem)
        for context in contexts:
            context.load_cert_chain(name)
    finally:
        os.unlink(name)


def control_plane_context(roots_pem: str) -> ssl.SSLContext:
    """HTTPS to the control plane: only the mesh roots, its host name checked, no client certificate."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, roots_pem)
    context.check_hostname = True
    return context


def contexts(credential: Credential, roots_pem: str, scratch: Path) -> Contexts:
    """The three contexts presenting `credential`; WorkloadError when ssl refuses it."""
    built = Contexts(
        server=_base(ssl.PROTOCOL_TLS_SERVER, roots_pem),
        client=_base(ssl.PROTOCOL_TLS_CLIENT, roots_pem),
        control_plane=control_plane_context(roots_pem),
    )
    try:
        _load_chain((built.server, built.client, built.control_plane), credential, scratch)
    except (ssl.SSLError, OSError) as exc:
        raise WorkloadError(f"cannot build TLS contexts from the workload certificate: {exc}") from exc
    return built
