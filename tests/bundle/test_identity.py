"""SPIFFE IDs and X.509-SVID verification: every rule enforced on its own.

The certificates here are built directly with cryptography (not with the mesh CA), so
each bad leaf differs from a good one in exactly one thing; `test_the_good_leaf_verifies`
is the control that shows the same builder makes a leaf `verify_svid` accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from starmesh.bundle.errors import BundleError, IdentityError
from starmesh.bundle.identity import (
    MAX_CHAIN_CERTIFICATES,
    MAX_PEM_BYTES,
    check_trust_domain,
    control_plane_id,
    load_certificates,
    parse_spiffe_id,
    spiffe_id,
    verify_svid,
)
from starmesh.compiler.values import ValueProblem, check_domain

TD = "cluster.local"
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=timezone.utc)
SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Root:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_root(common_name: str = "test mesh CA") -> Root:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=365))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Root(certificate, key)


def key_usage(*, digital_signature: bool = False, key_encipherment: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


GOOD_KEY_USAGE = key_usage(digital_signature=True)


def uris(*values: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(v) for v in values]


@dataclass(frozen=True)
class Leaf:
    """What a test leaf carries; `None` leaves an extension out. Defaults make a good SVID."""

    sans: list[x509.GeneralName] | None = field(default_factory=lambda: uris(f"spiffe://{TD}/service/reviews"))
    basic_constraints: x509.BasicConstraints | None = x509.BasicConstraints(ca=False, path_length=None)
    key_usage: x509.KeyUsage | None = GOOD_KEY_USAGE
    key_usage_critical: bool = True
    eku: list[x509.ObjectIdentifier] | None = field(default_factory=lambda: [SERVER, CLIENT])
    not_before: datetime = NOW - timedelta(minutes=1)
    not_after: datetime = NOW + timedelta(hours=24)
    common_name: str = "reviews"


def make_leaf(root: Root, leaf: Leaf = Leaf()) -> bytes:
    """The leaf's DER, signed by `root`."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name)]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_before)
        .not_valid_after(leaf.not_after)
    )
    if leaf.sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(leaf.sans), critical=False)
    if leaf.basic_constraints is not None:
        builder = builder.add_extension(leaf.basic_constraints, critical=True)
    if leaf.key_usage is not None:
        builder = builder.add_extension(leaf.key_usage, critical=leaf.key_usage_critical)
    if leaf.eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(leaf.eku), critical=False)
    return builder.sign(root.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def root() -> Root:
    return make_root()


def verify(root: Root, der: bytes, **overrides: Any) -> str:
    arguments: dict[str, Any] = {"trust_domain": TD, "now": NOW, "usage": "client"} | overrides
    return verify_svid([der], [root.certificate], **arguments)


# --- SPIFFE IDs ------------------------------------------------------------------------


def test_spiffe_id_round_trips() -> None:
    uri = spiffe_id("prod.example.com", "reviews")
    assert uri == "spiffe://prod.example.com/service/reviews"
    assert parse_spiffe_id(uri) == ("prod.example.com", "reviews")
    assert control_plane_id(TD) == "spiffe://cluster.local/control-plane"


@pytest.mark.parametrize(
    "uri",
    [
        "https://cluster.local/service/reviews",
        "SPIFFE://cluster.local/service/reviews",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/service",
        "spiffe://cluster.local/service/",
        "spiffe://cluster.local/service/reviews/",
        "spiffe://cluster.local/service/reviews/v1",
        "spiffe://cluster.local/ns/default/sa/reviews",
        "spiffe://cluster.local/svc/reviews",
        "spiffe://cluster.local/control-plane",
        "spiffe://Cluster.local/service/reviews",
        "spiffe://cluster.local/service/Reviews",
        "spiffe://cluster.local:8443/service/reviews",
        "spiffe://user@cluster.local/service/reviews",
        "spiffe://cluster.local/service/reviews?x=1",
        "spiffe://cluster.local/service/reviews#frag",
        "spiffe://cluster.local/service/re%76iews",
        "spiffe:///service/reviews",
        "spiffe://cluster..local/service/reviews",
    ],
)
def test_parse_spiffe_id_refuses_anything_but_a_service_id(uri: str) -> None:
    with pytest.raises(IdentityError, match="SPIFFE ID"):
        parse_spiffe_id(uri)


@pytest.mark.parametrize(("trust_domain", "service"), [("Cluster.local", "a"), ("td", "-a"), ("td", "a" * 64), ("", "a")])
def test_spiffe_id_refuses_bad_names(trust_domain: str, service: str) -> None:
    with pytest.raises(IdentityError, match="invalid"):
        spiffe_id(trust_domain, service)


@pytest.mark.parametrize(
    "text",
    ["cluster.local", "a", "a-b.c-d", "x" * 63, ".".join(["a" * 63] * 4), "UPPER.case", "a..b", "a.", "-a", "a_b",
     "a" * 64, ".".join(["a" * 63] * 4) + ".b", "", "a b", "é.com"],
)
def test_the_trust_domain_rule_is_the_compilers(text: str) -> None:
    """`mesh(trust_domain = ...)` and the identity code accept exactly the same names."""
    try:
        check_domain(text)
        compiler_accepts = True
    except ValueProblem:
        compiler_accepts = False
    try:
        check_trust_domain(text)
        identity_accepts = True
    except IdentityError:
        identity_accepts = False
    assert identity_accepts == compiler_accepts


def test_identity_error_is_a_bundle_error() -> None:
    assert issubclass(IdentityError, BundleError)


# --- load_certificates --------------------------------------------------------------------


def test_load_certificates_reads_every_certificate_in_order(root: Root) -> None:
    other = make_root("another")
    pem = root.certificate.public_bytes(serialization.Encoding.PEM) + other.certificate.public_bytes(serialization.Encoding.PEM)
    assert load_certificates(pem) == [root.certificate, other.certificate]


@pytest.mark.parametrize("pem", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_load_certificates_refuses_what_is_not_pem(pem: bytes) -> None:
    with pytest.raises(IdentityError, match="not a PEM certificate"):
        load_certificates(pem)


def test_load_certificates_refuses_oversized_input(root: Root) -> None:
    pem = root.certificate.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="limit"):
        load_certificates(pem * (MAX_PEM_BYTES // len(pem) + 1))


# --- verify_svid: the good leaf ------------------------------------------------------------


@pytest.mark.parametrize("usage", ["client", "server"])
def test_the_good_leaf_verifies(root: Root, usage: str) -> None:
    assert verify(root, make_leaf(root), usage=usage) == "reviews"


def test_the_common_name_is_never_read(root: Root) -> None:
    assert verify(root, make_leaf(root, Leaf(common_name="ratings"))) == "reviews"


def test_a_naive_now_means_utc(root: Root) -> None:
    der = make_leaf(root, Leaf(not_after=NOW + timedelta(minutes=5)))
    assert verify(root, der, now=(NOW + timedelta(minutes=4)).replace(tzinfo=None)) == "reviews"
    with pytest.raises(IdentityError, match="expired"):
        verify(root, der, now=(NOW + timedelta(minutes=6)).replace(tzinfo=None))


def test_any_of_several_roots_may_sign(root: Root) -> None:
    other = make_root("another")
    assert verify_svid([make_leaf(root)], [other.certificate, root.certificate], trust_domain=TD, now=NOW, usage="server") == "reviews"


def test_extra_san_types_beside_the_one_uri_are_allowed(root: Root) -> None:
    """X.509-SVID: exactly one URI SAN, any number of other SAN types."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"spiffe://{TD}/service/reviews"), x509.DNSName("reviews")]
    assert verify(root, make_leaf(root, Leaf(sans=sans))) == "reviews"


# --- verify_svid: each rule on its own ----------------------------------------------------


BAD_LEAVES: dict[str, tuple[Leaf, str]] = {
    "not yet valid": (Leaf(not_before=NOW + timedelta(minutes=5)), "not valid yet"),
    "expired": (Leaf(not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(seconds=1)), "expired"),
    "cA=true": (Leaf(basic_constraints=x509.BasicConstraints(ca=True, path_length=None)), r"is a CA certificate"),
    "no basicConstraints": (Leaf(basic_constraints=None), "no basicConstraints"),
    "two URI SANs": (Leaf(sans=uris(f"spiffe://{TD}/service/reviews", f"spiffe://{TD}/service/ratings")), "2 URI SANs"),
    "no SAN at all": (Leaf(sans=None), "no subjectAltName"),
    "a DNS SAN only": (Leaf(sans=[x509.DNSName("reviews.cluster.local")]), "0 URI SANs"),
    "an https URI": (Leaf(sans=uris("https://cluster.local/service/reviews")), "not a SPIFFE ID"),
    "another trust domain": (Leaf(sans=uris("spiffe://evil.example/service/reviews")), "trust domain 'evil.example'"),
    "Kubernetes path shape": (Leaf(sans=uris(f"spiffe://{TD}/ns/default/sa/reviews")), "/service/<name>"),
    "control-plane path": (Leaf(sans=uris(f"spiffe://{TD}/control-plane")), "/service/<name>"),
    "no keyUsage": (Leaf(key_usage=None), "no keyUsage"),
    "non-critical keyUsage": (Leaf(key_usage_critical=False), "non-critical keyUsage"),
    "keyUsage without digitalSignature": (Leaf(key_usage=key_usage(key_encipherment=True)), "lacks digitalSignature"),
    "keyUsage with keyCertSign": (
        Leaf(key_usage=key_usage(digital_signature=True, cert_sign=True)),
        "keyCertSign",
    ),
    "no extendedKeyUsage": (Leaf(eku=None), "no extendedKeyUsage"),
}


@pytest.mark.parametrize("case", sorted(BAD_LEAVES))
def test_verify_svid_refuses(root: Root, case: str) -> None:
    leaf, message = BAD_LEAVES[case]
    der = make_leaf(root, leaf)
    for usage in ("client", "server"):
        with pytest.raises(IdentityError, match=message):
            verify(root, der, usage=usage)


@pytest.mark.parametrize(("eku", "refused"), [([SERVER], "client"), ([CLIENT], "server")])
def test_the_eku_must_allow_the_usage(root: Root, eku: list[x509.ObjectIdentifier], refused: str) -> None:
    der = make_leaf(root, Leaf(eku=eku))
    allowed = "server" if refused == "client" else "client"
    assert verify(root, der, usage=allowed) == "reviews"
    with pytest.raises(IdentityError, match=f"lacks {refused}Auth"):
        verify(root, der, usage=refused)


def test_a_leaf_of_another_ca_is_refused(root: Root) -> None:
    other = make_root("another")
    with pytest.raises(IdentityError, match="does not chain to the mesh CA"):
        verify(root, make_leaf(other))


def test_a_forged_issuer_name_is_refused(root: Root) -> None:
    """Another key under the very same CA name: only the signature tells them apart."""
    impostor = make_root(str(root.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value))
    assert impostor.certificate.subject == root.certificate.subject
    with pytest.raises(IdentityError, match="does not chain to the mesh CA"):
        verify(root, make_leaf(impostor))


def test_a_tampered_leaf_is_refused(root: Root) -> None:
    der = bytearray(make_leaf(root))
    der[-1] ^= 0x01  # the last byte of the signature
    with pytest.raises(IdentityError, match="does not chain|not valid DER"):
        verify(root, bytes(der))


@pytest.mark.parametrize(
    ("chain", "roots", "message"),
    [
        (lambda r: [], lambda r: [r.certificate], "no certificate"),
        (lambda r: [make_leaf(r)], lambda r: [], "no mesh root"),
        (lambda r: [make_leaf(r)] * (MAX_CHAIN_CERTIFICATES + 1), lambda r: [r.certificate], "over the limit"),
        (lambda r: [b"\x30\x03\x02\x01\x00"], lambda r: [r.certificate], "not valid DER"),
    ],
)
def test_verify_svid_refuses_bad_input(
    root: Root, chain: Callable[[Root], list[bytes]], roots: Callable[[Root], list[x509.Certificate]], message: str
) -> None:
    with pytest.raises(IdentityError, match=message):
        verify_svid(chain(root), roots(root), trust_domain=TD, now=NOW, usage="client")
