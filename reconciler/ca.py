"""The mesh CA: one self-signed root per mesh, which signs each proxy's X.509-SVID.

    starmesh ca init --trust-domain cluster.local --out ca/
        ca/ca.crt   PEM, the root              -> control-plane --ca ca/, proxy --ca-cert ca/ca.crt
        ca/ca.key   PEM PKCS#8, mode 0600      -> control-plane --ca ca/ (never leaves it)

    root   ECDSA P-256, self-signed, 10 years, URI SAN spiffe://<td> (how `load_ca`
           learns the trust domain), basicConstraints cA=true pathLen 0 (it signs leaves
           only), keyUsage keyCertSign + cRLSign
    leaf   from the proxy's CSR (its private key never leaves the proxy): the CSR's key,
           exactly one URI SAN spiffe://<td>/service/<name>, cA=false, keyUsage (critical)
           digitalSignature (+ keyEncipherment for RSA), EKU serverAuth + clientAuth,
           notBefore now - 1 min (clock skew), notAfter now + lifetime (default 24 h,
           never past the root's own expiry), random serial

`issue_svid` checks the CSR before it signs: its self-signature, its key type and that
it asks for exactly the identity of the service it is issued for, nothing more. Who may
ask for which service is the API's decision (join token or the caller's own SVID).
`server_certificate` makes the control plane's own TLS certificate (DNS/IP SANs for the
hosts clients dial, plus spiffe://<td>/control-plane, which `verify_svid` never takes
for a service). Every failure is a `CAError` saying what is wrong and what to do.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.files import read_bounded, write_new_file
from starmesh.bundle.identity import SPIFFE_SCHEME, control_plane_id, load_certificates, spiffe_id
from starmesh.compiler.values import ValueProblem, check_domain
from starmesh.reconciler.errors import CAError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_LIFETIME",
    "MAX_CSR_BYTES",
    "MAX_LIFETIME",
    "MeshCA",
    "init_ca",
    "issue_svid",
    "load_ca",
    "server_certificate",
]

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
DEFAULT_LIFETIME = timedelta(hours=24)
"""A proxy certificate's lifetime unless the control plane is told otherwise."""
MAX_LIFETIME = timedelta(days=366)
"""The longest lifetime `issue_svid` and `server_certificate` accept."""
ROOT_LIFETIME = timedelta(days=3650)
MAX_CSR_BYTES = 64 * 1024
"""A CSR larger than this is refused before it is parsed."""

_MAX_FILE_BYTES = 256 * 1024
_BACKDATE = timedelta(minutes=1)
_HOST = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_SERVER_AUTH, _CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
_INIT_HINT = "create one with `starmesh ca init --trust-domain TD --out DIR`"


@dataclass(frozen=True)
class MeshCA:
    """The mesh root and its private key, as the control plane holds them."""

    certificate: x509.Certificate
    key: PrivateKeyTypes
    trust_domain: str


def init_ca(trust_domain: str, out: Path) -> tuple[Path, Path]:
    """Write a new root, `out/ca.crt` and `out/ca.key` (0600); returns (cert path, key path).

    Creates `out` if needed; an existing file is never overwritten (each file is created
    exclusively): replacing the root would cut off every proxy that trusts the old one."""
    try:
        check_domain(trust_domain)
    except ValueProblem as exc:
        raise CAError(f"{exc}: {exc.hint}") from exc
    out = Path(out)
    cert_path, key_path = out / CA_CERT_FILE, out / CA_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise CAError(
                f"{path}: already exists; remove it or choose another --out "
                "(a new root would cut off every proxy that trusts this one)"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CAError(f"{out}: cannot create the CA directory: {exc.strerror}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    name = _name(f"starmesh mesh CA {trust_domain}")
    trust_domain_uri = x509.UniformResourceIdentifier(SPIFFE_SCHEME + trust_domain)
    certificate = (
        _builder(name, name, key.public_key(), now - _BACKDATE, now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectAlternativeName([trust_domain_uri]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new_file(key_path, _key_pem(key), mode=0o600)
    try:
        _write_new_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    except CAError:
        key_path.unlink(missing_ok=True)
        raise
    return cert_path, key_path


def load_ca(directory: Path) -> MeshCA:
    """The CA in `directory` (ca.crt + ca.key), checked: a CA cert, valid now, its key."""
    cert_path, key_path = Path(directory) / CA_CERT_FILE, Path(directory) / CA_KEY_FILE
    try:
        certificate = load_certificates(_read(cert_path))[0]
    except IdentityError as exc:
        raise CAError(f"{cert_path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except TypeError as exc:
        raise CAError(f"{key_path}: the key is encrypted; starmesh needs an unencrypted PEM PKCS#8 key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CAError(f"{key_path}: not a PEM PKCS#8 private key ({_INIT_HINT})") from exc
    _check_ca_key(key, where=str(key_path))
    if key.public_key() != certificate.public_key():
        raise CAError(f"{key_path} is not the key of {cert_path}: keep the two files of one `starmesh ca init` together")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound as exc:
        raise CAError(f"{cert_path}: not a starmesh mesh root ({exc}); {_INIT_HINT}") from exc
    if not constraints.ca:
        raise CAError(f"{cert_path}: not a CA certificate (cA=false); {_INIT_HINT}")
    domains = [uri[len(SPIFFE_SCHEME) :] for uri in uris if uri.startswith(SPIFFE_SCHEME)]
    if len(domains) != 1:
        raise CAError(f"{cert_path}: names no trust domain (one URI SAN spiffe://<td> expected); {_INIT_HINT}")
    try:
        check_domain(domains[0])
    except ValueProblem as exc:
        raise CAError(f"{cert_path}: {exc}") from exc
    if datetime.now(timezone.utc) > certificate.not_valid_after_utc:
        expired = certificate.not_valid_after_utc.isoformat()
        raise CAError(f"{cert_path}: the root expired {expired}; {_INIT_HINT} and roll it out")
    return MeshCA(certificate=certificate, key=key, trust_domain=domains[0])


def issue_svid(ca: MeshCA, csr_pem: bytes, *, service: str, lifetime: timedelta, now: datetime) -> bytes:
    """Sign the X.509-SVID of `service` for the key in `csr_pem`; returns the leaf as PEM."""
    try:
        wanted = spiffe_id(ca.trust_domain, service)
    except IdentityError as exc:
        raise CAError(f"cannot issue a certificate: {exc}") from exc
    csr = _parse_csr(csr_pem, service)
    try:
        requested = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise CAError(f"CSR for {service!r} has no subjectAltName: it must ask for exactly the URI {wanted}") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CAError(f"CSR for {service!r} has malformed extensions: {exc}") from exc
    if requested != [x509.UniformResourceIdentifier(wanted)]:
        asked = ", ".join(f"{type(n).__name__}:{n.value}" for n in requested) or "nothing"
        raise CAError(f"CSR for {service!r} asks for {asked}: it must ask for exactly the URI {wanted}")
    public_key = _leaf_key(csr, service)
    when = now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)
    builder = (
        _leaf_builder(ca, _name(service), public_key, when, lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(wanted)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([_SERVER_AUTH, _CLIENT_AUTH]), critical=False)
    )
    return _sign(builder, ca.key).public_bytes(serialization.Encoding.PEM)


def server_certificate(ca: MeshCA, hosts: Sequence[str], *, lifetime: timedelta) -> tuple[bytes, bytes]:
    """The control plane's TLS certificate and new key (PEM, PEM PKCS#8) for `hosts`."""
    if not hosts:
        raise CAError("the control plane's certificate needs at least one host name or address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            if len(host) > 253 or not _HOST.fullmatch(host.lower()):
                raise CAError(f"{host!r} is neither an IP address nor a DNS name: give the host clients dial") from None
            names.append(x509.DNSName(host.lower()))
    names.append(x509.UniformResourceIdentifier(control_plane_id(ca.trust_domain)))
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _leaf_builder(ca, _name("starmesh control plane"), key.public_key(), datetime.now(timezone.utc), lifetime)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([_SERVER_AUTH]), critical=False)
    )
    return _sign(builder, ca.key).public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _leaf_builder(
    ca: MeshCA, subject: x509.Name, public_key: CertificatePublicKeyTypes, now: datetime, lifetime: timedelta
) -> x509.CertificateBuilder:
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise CAError(f"certificate lifetime {lifetime} is out of range: give more than 0, at most {MAX_LIFETIME.days} days")
    root_ends = ca.certificate.not_valid_after_utc
    if now >= root_ends:
        raise CAError(f"the mesh CA expired {root_ends.isoformat()}; {_INIT_HINT} and roll it out")
    return (
        _builder(subject, ca.certificate.subject, public_key, now - _BACKDATE, min(now + lifetime, root_ends))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_encipherment=isinstance(public_key, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca.certificate), critical=False)
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _name(common_name: str) -> x509.Name:
    """A subject or issuer name; informational only (identities live in the URI SAN)."""
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "starmesh"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _authority_key_id(root: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(root.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _key_usage(*, cert_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _parse_csr(csr_pem: bytes, service: str) -> x509.CertificateSigningRequest:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CAError(f"CSR for {service!r} is {len(csr_pem)} bytes, over the {MAX_CSR_BYTES}-byte limit")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CAError(f"CSR for {service!r} is not a PEM certificate request: {exc}") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CAError(f"CSR for {service!r}: cannot check its signature: {exc}") from exc
    if not valid:
        raise CAError(f"CSR for {service!r} has a bad signature: it was not signed by the key it carries")
    return csr


def _leaf_key(csr: x509.CertificateSigningRequest, service: str) -> CertificatePublicKeyTypes:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CAError(f"CSR for {service!r} carries a key starmesh cannot read: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey) and 2048 <= key.key_size <= 8192:
        return key
    kind = type(key).__name__
    raise CAError(f"CSR for {service!r} carries a {kind} key: use ECDSA P-256 (or Ed25519, or RSA 2048-8192 bits)")


def _check_ca_key(key: PrivateKeyTypes, *, where: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise CAError(f"{where}: a {type(key).__name__} cannot sign certificates; {_INIT_HINT}")


def _sign(builder: x509.CertificateBuilder, key: PrivateKeyTypes) -> x509.Certificate:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return builder.sign(key, hashes.SHA256())
    _check_ca_key(key, where="the mesh CA key")
    raise AssertionError("unreachable")  # pragma: no cover


def _read(path: Path) -> bytes:
    try:
        data = read_bounded(path, _MAX_FILE_BYTES)
    except FileNotFoundError:
        raise CAError(f"{path}: no such file; {_INIT_HINT}") from None
    except OSError as exc:
        raise CAError(f"{path}: cannot read: {exc.strerror}") from exc
    if data is None:
        raise CAError(f"{path}: over {_MAX_FILE_BYTES} bytes, too large for a CA file")
    return data


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    try:
        write_new_file(path, data, mode=mode)
    except OSError as exc:
        raise CAError(f"{path}: cannot create: {exc.strerror}") from exc
