"""Mesh identity: SPIFFE IDs and X.509-SVID verification, shared by the control plane
(which issues SVIDs) and the proxy (which presents and checks them).

A workload's identity is one URI, `spiffe://<trust_domain>/service/<name>`, carried as
the only URI SAN of a short-lived certificate signed by the mesh root:

    mesh root (ca.crt, cA=true pathLen 0)          trusted by every proxy (--ca-cert)
      └── leaf X.509-SVID                          one per proxy, from its own CSR
            URI SAN  spiffe://cluster.local/service/reviews
            basicConstraints cA=false, keyUsage (critical) digitalSignature,
            extendedKeyUsage serverAuth + clientAuth

Python's `ssl` checks the chain during the handshake but its hostname check cannot read
a SPIFFE ID (and must be off, `check_hostname=False`), so `verify_svid` checks every
SVID rule itself on the peer's DER certificate, whatever the handshake already did:

    1. trust      the chain builds to one of the mesh roots (`cryptography.x509.verification`:
                  signature, validity window at `now`, the root's CA extensions)
    2. identity   exactly one URI SAN; `spiffe://`, this trust domain, path `/service/<name>`
    3. leaf-ness  basicConstraints present with cA=false; no keyCertSign / cRLSign
    4. usage      keyUsage present, critical, with digitalSignature; extendedKeyUsage
                  with clientAuth (a caller's cert) or serverAuth (a server's cert)

The subject (CN) is never read. Names follow the compiler's rules (DESIGN.md, Matching):
a trust domain is lower-case DNS labels joined by dots, a service name one DNS label.
This module imports no stage: cryptography only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from starmesh.bundle.errors import IdentityError

__all__ = [
    "CONTROL_PLANE_PATH",
    "MAX_CHAIN_CERTIFICATES",
    "MAX_PEM_BYTES",
    "SERVICE_PATH_PREFIX",
    "SPIFFE_SCHEME",
    "Usage",
    "check_service_name",
    "check_trust_domain",
    "control_plane_id",
    "load_certificates",
    "parse_spiffe_id",
    "spiffe_id",
    "verify_svid",
]

SPIFFE_SCHEME = "spiffe://"
SERVICE_PATH_PREFIX = "/service/"
CONTROL_PLANE_PATH = "/control-plane"
"""The control plane's own SPIFFE ID path (`spiffe://<td>/control-plane`); not a service."""

MAX_CHAIN_CERTIFICATES = 4
"""A peer chain longer than this is refused before anything is parsed."""
MAX_PEM_BYTES = 256 * 1024
"""A PEM bundle larger than this is refused before it is parsed."""

Usage = Literal["client", "server"]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_LABEL = 63
_MAX_DOMAIN = 253
_EKU_FOR: dict[str, tuple[x509.ObjectIdentifier, str]] = {
    "client": (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    "server": (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
}


def check_trust_domain(text: str) -> str:
    """A trust domain: lower-case DNS labels joined by dots (the compiler's `domain` rule)."""
    labels = text.split(".")
    if len(text) > _MAX_DOMAIN or not all(len(x) <= _MAX_LABEL and _LABEL.fullmatch(x) for x in labels):
        raise IdentityError(f"invalid trust domain {text!r}: write a lower-case DNS name, e.g. 'cluster.local'")
    return text


def check_service_name(text: str) -> str:
    """A service name: one lower-case DNS label, at most 63 characters."""
    if len(text) > _MAX_LABEL or not _LABEL.fullmatch(text):
        raise IdentityError(
            f"invalid service name {text!r}: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return text


def spiffe_id(trust_domain: str, service: str) -> str:
    """The service's SPIFFE ID, `spiffe://<trust_domain>/service/<service>`."""
    return f"{SPIFFE_SCHEME}{check_trust_domain(trust_domain)}{SERVICE_PATH_PREFIX}{check_service_name(service)}"


def control_plane_id(trust_domain: str) -> str:
    """The control plane's SPIFFE ID, `spiffe://<trust_domain>/control-plane`."""
    return f"{SPIFFE_SCHEME}{check_trust_domain(trust_domain)}{CONTROL_PLANE_PATH}"


def parse_spiffe_id(uri: str) -> tuple[str, str]:
    """(trust domain, service) of a `spiffe://<td>/service/<name>` URI; IdentityError otherwise.

    Written out by hand rather than with urllib: no port, user, query, fragment, percent
    escapes or upper case are accepted, and the path has exactly two segments."""
    if not uri.startswith(SPIFFE_SCHEME):
        raise IdentityError(f"{uri!r} is not a SPIFFE ID: it must start with {SPIFFE_SCHEME!r}")
    rest = uri[len(SPIFFE_SCHEME) :]
    trust_domain, slash, path = rest.partition("/")
    if not slash:
        raise IdentityError(f"SPIFFE ID {uri!r} has no path: expected spiffe://<trust_domain>/service/<name>")
    try:
        check_trust_domain(trust_domain)
    except IdentityError as exc:
        raise IdentityError(f"SPIFFE ID {uri!r}: {exc}") from exc
    segments = path.split("/")
    if len(segments) != 2 or segments[0] != "service":
        raise IdentityError(
            f"SPIFFE ID {uri!r} has path /{path}: a workload's path is /service/<name>"
        )
    try:
        check_service_name(segments[1])
    except IdentityError as exc:
        raise IdentityError(f"SPIFFE ID {uri!r}: {exc}") from exc
    return trust_domain, segments[1]


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (at least one), in file order."""
    if len(pem) > MAX_PEM_BYTES:
        raise IdentityError(f"certificate PEM is {len(pem)} bytes, over the {MAX_PEM_BYTES}-byte limit")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate (expected '-----BEGIN CERTIFICATE-----' blocks): {exc}") from exc
    if not certificates:  # pragma: no cover - cryptography raises on an empty bundle
        raise IdentityError("the PEM holds no certificate")
    return certificates


def verify_svid(
    chain: Sequence[bytes],
    roots: Sequence[x509.Certificate],
    *,
    trust_domain: str,
    now: datetime,
    usage: Usage,
) -> str:
    """The service named by a peer's X.509-SVID, after checking every rule (module docs).

    `chain` is DER, leaf first (further certificates are offered as intermediates);
    `roots` are the mesh roots; `now` is timezone-aware (naive means UTC); `usage` is
    "client" for a caller's certificate, "server" for the certificate of the server
    we connected to. Raises IdentityError naming the rule that failed."""
    if not chain:
        raise IdentityError("the peer presented no certificate")
    if len(chain) > MAX_CHAIN_CERTIFICATES:
        raise IdentityError(f"the peer's chain has {len(chain)} certificates, over the limit of {MAX_CHAIN_CERTIFICATES}")
    if not roots:
        raise IdentityError("no mesh root to verify against: pass the mesh CA certificate (ca.crt)")
    if usage not in _EKU_FOR:
        raise ValueError(f"usage must be 'client' or 'server', not {usage!r}")
    try:
        leaf, *intermediates = (x509.load_der_x509_certificate(der) for der in chain)
    except ValueError as exc:
        raise IdentityError(f"the peer's certificate is not valid DER: {exc}") from exc
    when = now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)
    what = f"certificate serial {leaf.serial_number:x}"
    try:
        extensions = leaf.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise IdentityError(f"{what} has malformed extensions: {exc}") from exc
    _check_validity(leaf, when, what)
    _check_chain(leaf, intermediates, roots, when, what)
    service = _check_identity(extensions, trust_domain, what)
    _check_leaf(extensions, what)
    _check_usage(extensions, usage, what)
    return service


def _check_validity(leaf: x509.Certificate, now: datetime, what: str) -> None:
    if now < leaf.not_valid_before_utc:
        raise IdentityError(f"{what} is not valid yet: its validity starts {leaf.not_valid_before_utc.isoformat()}")
    if now > leaf.not_valid_after_utc:
        raise IdentityError(f"{what} expired {leaf.not_valid_after_utc.isoformat()}: the workload must renew it")


def _check_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
    what: str,
) -> None:
    # Chain building, signatures and the CAs' extensions: cryptography's verifier, with the
    # leaf's extensions left to the explicit checks below (the Web PKI end-entity policy
    # would demand a DNS name; the client verifier's EKU is checked per `usage` instead).
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(len(intermediates) + 1)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise IdentityError(f"{what} (issuer {leaf.issuer.rfc4514_string()}) does not chain to the mesh CA: {exc}") from exc


def _check_identity(extensions: x509.Extensions, trust_domain: str, what: str) -> str:
    try:
        sans = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(f"{what} has no subjectAltName: an SVID carries its SPIFFE ID as a URI SAN") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"{what} has {len(uris)} URI SANs {uris}: an SVID carries exactly one")
    peer_domain, service = parse_spiffe_id(uris[0])
    if peer_domain != trust_domain:
        raise IdentityError(
            f"{what} names {uris[0]!r}, of trust domain {peer_domain!r}: this mesh is {trust_domain!r}"
        )
    return service


def _check_leaf(extensions: x509.Extensions, what: str) -> None:
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise IdentityError(f"{what} has no basicConstraints: an SVID leaf states cA=false") from None
    if constraints.ca:
        raise IdentityError(f"{what} is a CA certificate (cA=true): a workload's SVID must be a leaf")


def _check_usage(extensions: x509.Extensions, usage: Usage, what: str) -> None:
    try:
        key_usage = extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise IdentityError(f"{what} has no keyUsage: an SVID needs a critical keyUsage with digitalSignature") from None
    if not key_usage.critical:
        raise IdentityError(f"{what} has a non-critical keyUsage: an SVID's keyUsage must be critical")
    if not key_usage.value.digital_signature:
        raise IdentityError(f"{what}'s keyUsage lacks digitalSignature, which TLS needs")
    if key_usage.value.key_cert_sign or key_usage.value.crl_sign:
        raise IdentityError(f"{what}'s keyUsage allows keyCertSign or cRLSign: an SVID leaf must not sign certificates")
    wanted, name = _EKU_FOR[usage]
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityError(f"{what} has no extendedKeyUsage: it needs {name} to act as a {usage}") from None
    if wanted not in eku:
        raise IdentityError(f"{what}'s extendedKeyUsage lacks {name}: it cannot act as a TLS {usage}")
