"""The mesh CA: the root on disk, SVIDs from real CSRs, the control plane's certificate.

Leaves are checked three ways: by `verify_svid`, by the real `openssl verify` and in a
real TLS handshake on loopback between two workloads (Python's ssl, as the proxy uses it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import stat
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.identity import Usage, load_certificates, verify_svid
from starmesh.reconciler.ca import (
    DEFAULT_LIFETIME,
    MAX_CSR_BYTES,
    MeshCA,
    init_ca,
    issue_svid,
    load_ca,
    server_certificate,
)
from starmesh.reconciler.errors import CAError, ReconcilerError

TD = "cluster.local"
DEADLINE = 30.0
"""Seconds a wait may take: a bound on waiting, never an assertion about speed."""


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mesh") / "ca"
    init_ca(TD, directory)
    return directory


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> MeshCA:
    return load_ca(ca_dir)


def now() -> datetime:
    return datetime.now(timezone.utc)


def csr(
    *uris: str,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    dns: tuple[str, ...] = (),
) -> bytes:
    """A CSR (PEM) for `key` (a new P-256 key by default) asking for these SANs."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def reviews_csr(key: CertificateIssuerPrivateKeyTypes | None = None) -> bytes:
    return csr(f"spiffe://{TD}/service/reviews", key=key)


def der(pem: bytes) -> bytes:
    return load_certificates(pem)[0].public_bytes(serialization.Encoding.DER)


# --- init_ca and load_ca ----------------------------------------------------------------


def test_init_ca_writes_the_root_and_its_key(tmp_path: Path) -> None:
    cert_path, key_path = init_ca(TD, tmp_path / "new" / "ca")
    assert (cert_path.name, key_path.name) == ("ca.crt", "ca.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    root = load_certificates(cert_path.read_bytes())[0]
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert load_ca(cert_path.parent).trust_domain == TD


@pytest.mark.parametrize("existing", ["ca.crt", "ca.key"])
def test_init_ca_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"keep me")
    with pytest.raises(CAError, match="already exists"):
        init_ca(TD, tmp_path)
    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


@pytest.mark.parametrize("trust_domain", ["Cluster.local", "cluster_local", "", "a..b", "-x.local", "x" * 64])
def test_init_ca_refuses_a_bad_trust_domain(tmp_path: Path, trust_domain: str) -> None:
    with pytest.raises(CAError, match="invalid trust domain"):
        init_ca(trust_domain, tmp_path / "ca")
    assert not (tmp_path / "ca").exists()


def test_load_ca_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CAError, match=r"ca\.crt: no such file; create one with `starmesh ca init"):
        load_ca(tmp_path)


def test_load_ca_refuses_a_key_of_another_ca(tmp_path: Path, ca_dir: Path) -> None:
    init_ca(TD, tmp_path / "other")
    shutil.copy(ca_dir / "ca.crt", tmp_path / "ca.crt")
    shutil.copy(tmp_path / "other" / "ca.key", tmp_path / "ca.key")
    with pytest.raises(CAError, match="is not the key of"):
        load_ca(tmp_path)


def test_load_ca_refuses_a_garbage_key(tmp_path: Path, ca_dir: Path) -> None:
    shutil.copy(ca_dir / "ca.crt", tmp_path / "ca.crt")
    (tmp_path / "ca.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CAError, match="not a PEM PKCS#8 private key"):
        load_ca(tmp_path)


def test_load_ca_refuses_a_leaf_as_the_root(tmp_path: Path, ca: MeshCA) -> None:
    cert_pem, key_pem = server_certificate(ca, ["127.0.0.1"], lifetime=timedelta(hours=1))
    (tmp_path / "ca.crt").write_bytes(cert_pem)
    (tmp_path / "ca.key").write_bytes(key_pem)
    with pytest.raises(CAError, match=r"not a CA certificate"):
        load_ca(tmp_path)


def test_ca_error_is_a_reconciler_error() -> None:
    assert issubclass(CAError, ReconcilerError)


# --- issue_svid ---------------------------------------------------------------------------


def test_issue_svid_gives_a_leaf_verify_svid_accepts(ca: MeshCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    at = now()
    pem = issue_svid(ca, reviews_csr(key), service="reviews", lifetime=DEFAULT_LIFETIME, now=at)
    usages: tuple[Usage, ...] = ("client", "server")
    for usage in usages:
        assert verify_svid([der(pem)], [ca.certificate], trust_domain=TD, now=at, usage=usage) == "reviews"
    leaf = load_certificates(pem)[0]
    assert leaf.public_key() == key.public_key()  # the proxy's own key: it never left the proxy
    assert leaf.not_valid_before_utc == (at - timedelta(minutes=1)).replace(microsecond=0)
    assert leaf.not_valid_after_utc == (at + timedelta(hours=24)).replace(microsecond=0)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/service/reviews")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage_ext.critical and usage_ext.value.digital_signature and not usage_ext.value.key_encipherment
    with pytest.raises(IdentityError, match="expired"):  # the lifetime is enforced
        verify_svid([der(pem)], [ca.certificate], trust_domain=TD, now=at + timedelta(hours=25), usage="client")


def test_serials_are_random(ca: MeshCA) -> None:
    serials = {
        load_certificates(issue_svid(ca, reviews_csr(), service="reviews", lifetime=DEFAULT_LIFETIME, now=now()))[0].serial_number
        for _ in range(5)
    }
    assert len(serials) == 5


def test_the_lifetime_is_configurable_and_bounded_by_the_root(ca: MeshCA) -> None:
    at = now()
    pem = issue_svid(ca, reviews_csr(), service="reviews", lifetime=timedelta(hours=2), now=at)
    assert load_certificates(pem)[0].not_valid_after_utc == (at + timedelta(hours=2)).replace(microsecond=0)
    late = ca.certificate.not_valid_after_utc - timedelta(hours=1)
    pem = issue_svid(ca, reviews_csr(), service="reviews", lifetime=timedelta(hours=24), now=late)
    assert load_certificates(pem)[0].not_valid_after_utc == ca.certificate.not_valid_after_utc
    with pytest.raises(CAError, match="mesh CA expired"):
        issue_svid(ca, reviews_csr(), service="reviews", lifetime=DEFAULT_LIFETIME, now=ca.certificate.not_valid_after_utc)


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-1), timedelta(days=367)])
def test_an_unreasonable_lifetime_is_refused(ca: MeshCA, lifetime: timedelta) -> None:
    with pytest.raises(CAError, match="lifetime"):
        issue_svid(ca, reviews_csr(), service="reviews", lifetime=lifetime, now=now())


@pytest.mark.parametrize(
    "key",
    [ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(public_exponent=65537, key_size=2048)],
    ids=["ed25519", "rsa2048"],
)
def test_ed25519_and_rsa_keys_are_accepted(ca: MeshCA, key: CertificateIssuerPrivateKeyTypes) -> None:
    at = now()
    pem = issue_svid(ca, reviews_csr(key), service="reviews", lifetime=DEFAULT_LIFETIME, now=at)
    assert verify_svid([der(pem)], [ca.certificate], trust_domain=TD, now=at, usage="server") == "reviews"
    usage = load_certificates(pem)[0].extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment == isinstance(key, rsa.RSAPrivateKey)


def tampered(pem: bytes) -> bytes:
    """The CSR with its signature's last byte flipped (it still parses)."""
    request = x509.load_pem_x509_csr(pem)
    raw = bytearray(request.public_bytes(serialization.Encoding.DER))
    raw[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(raw)).public_bytes(serialization.Encoding.PEM)


BAD_CSRS: dict[str, tuple[Callable[[], bytes], str]] = {
    "a bad signature": (lambda: tampered(reviews_csr()), "bad signature"),
    "another service": (lambda: csr(f"spiffe://{TD}/service/ratings"), "asks for UniformResourceIdentifier:spiffe://cluster.local/service/ratings"),
    "another trust domain": (lambda: csr("spiffe://evil.example/service/reviews"), "must ask for exactly"),
    "an extra DNS SAN": (lambda: csr(f"spiffe://{TD}/service/reviews", dns=("reviews",)), "DNSName:reviews"),
    "two URI SANs": (lambda: csr(f"spiffe://{TD}/service/reviews", f"spiffe://{TD}/service/ratings"), "must ask for exactly"),
    "a DNS SAN only": (lambda: csr(dns=("reviews",)), "must ask for exactly"),
    "no SAN": (lambda: csr(), "no subjectAltName"),
    "a P-384 key": (lambda: reviews_csr(ec.generate_private_key(ec.SECP384R1())), "ECDSA P-256"),
    "RSA 1024": (lambda: reviews_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "ECDSA P-256"),
    "not PEM": (lambda: b"hello", "not a PEM certificate request"),
    "too large": (lambda: b"x" * (MAX_CSR_BYTES + 1), "limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSRS))
def test_issue_svid_refuses_a_csr_with(ca: MeshCA, case: str) -> None:
    make, message = BAD_CSRS[case]
    with pytest.raises(CAError, match=message):
        issue_svid(ca, make(), service="reviews", lifetime=DEFAULT_LIFETIME, now=now())


def test_issue_svid_refuses_a_bad_service_name(ca: MeshCA) -> None:
    with pytest.raises(CAError, match="invalid service name"):
        issue_svid(ca, csr(f"spiffe://{TD}/service/Reviews"), service="Reviews", lifetime=DEFAULT_LIFETIME, now=now())


# --- the real tools: openssl and a TLS handshake ----------------------------------------------


def openssl_verify(ca_cert: Path, leaf: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca_cert), str(leaf)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_verifies_our_leaves(tmp_path: Path, ca_dir: Path, ca: MeshCA) -> None:
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(issue_svid(ca, reviews_csr(), service="reviews", lifetime=DEFAULT_LIFETIME, now=now()))
    for purpose in ("sslclient", "sslserver"):
        done = openssl_verify(ca_dir / "ca.crt", leaf, purpose)
        assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr
    # The control: a leaf of another CA does not verify against ours.
    init_ca(TD, tmp_path / "other")
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(issue_svid(load_ca(tmp_path / "other"), reviews_csr(), service="reviews", lifetime=DEFAULT_LIFETIME, now=now()))
    assert openssl_verify(ca_dir / "ca.crt", stranger, "sslclient").returncode != 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_control_plane_certificate(tmp_path: Path, ca_dir: Path, ca: MeshCA) -> None:
    cert_pem, key_pem = server_certificate(ca, ["127.0.0.1", "::1", "localhost"], lifetime=timedelta(hours=1))
    leaf = load_certificates(cert_pem)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/control-plane"]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == leaf.public_key()
    (tmp_path / "cp.pem").write_bytes(cert_pem)
    assert openssl_verify(ca_dir / "ca.crt", tmp_path / "cp.pem", "sslserver").returncode == 0
    # It can never pass for a workload.
    with pytest.raises(IdentityError, match="/service/<name>"):
        verify_svid([der(cert_pem)], [ca.certificate], trust_domain=TD, now=now(), usage="server")


@pytest.mark.parametrize(("hosts", "message"), [([], "at least one host"), (["bad host!"], "neither an IP address")])
def test_server_certificate_refuses_bad_hosts(ca: MeshCA, hosts: list[str], message: str) -> None:
    with pytest.raises(CAError, match=message):
        server_certificate(ca, hosts, lifetime=timedelta(hours=1))


def workload(tmp_path: Path, ca_dir: Path, ca: MeshCA, service: str, purpose: ssl.Purpose) -> ssl.SSLContext:
    """An SSLContext as the proxy builds one: its SVID, the mesh root only, no hostname check."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = tmp_path / f"{service}.crt"
    cert.write_bytes(issue_svid(ca, csr(f"spiffe://{TD}/service/{service}", key=key), service=service, lifetime=DEFAULT_LIFETIME, now=now()))
    key_file = tmp_path / f"{service}.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(purpose, cafile=str(ca_dir / "ca.crt"))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key_file)
    return context


def test_two_workloads_complete_a_mutual_tls_handshake(tmp_path: Path, ca_dir: Path, ca: MeshCA) -> None:
    server_context = workload(tmp_path, ca_dir, ca, "reviews", ssl.Purpose.CLIENT_AUTH)
    client_context = workload(tmp_path, ca_dir, ca, "productpage", ssl.Purpose.SERVER_AUTH)
    seen: dict[str, str] = {}

    def peer_service(writer: asyncio.StreamWriter, usage: Usage) -> str:
        ssl_object = writer.get_extra_info("ssl_object")
        chain = [ssl_object.getpeercert(binary_form=True)]
        return verify_svid(chain, [ca.certificate], trust_domain=TD, now=now(), usage=usage)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen["server saw"] = peer_service(writer, "client")
            writer.write(await reader.readexactly(4))
            await writer.drain()
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname=None), DEADLINE
            )
            try:
                seen["client saw"] = peer_service(writer, "server")
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), DEADLINE) == b"ping"
            finally:
                writer.close()
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert seen == {"server saw": "productpage", "client saw": "reviews"}
