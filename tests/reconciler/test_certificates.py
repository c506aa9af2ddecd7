"""Mesh identity on the control plane: HTTPS, the join token, certificate issuance and renewal,
and the proxy routes' client-certificate check, over real TLS on 127.0.0.1.

    tmp_path/ca (init_ca) ─► ControlPlane(--ca, --join-token) on 127.0.0.1:0, HTTPS
    test: ECDSA P-256 keys and CSRs (cryptography) ─► POST /v1/certificates ─► verify_svid
          client certificates in ssl contexts that trust only ca.crt (hostname checked)

Waits poll with a deadline; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from starmesh.bundle.identity import verify_svid
from starmesh.reconciler.ca import MeshCA, init_ca, issue_svid, load_ca
from starmesh.reconciler.certificates import MAX_CSR_BYTES, ServerTLS
from starmesh.reconciler.service import ControlPlane, ControlPlaneConfig

TOKEN = "join-token-0123456789abcdef"
TRUST_DOMAIN = "cluster.local"
LIFETIME = timedelta(hours=2)
DEADLINE = 30.0  # seconds a request may take: a bound, never an assertion about speed
HEARTBEAT = {"service": "reviews", "version": "v1", "address": "127.0.0.1:9081"}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A proxy's key and certificate on disk, and an ssl context presenting them."""

    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    context: ssl.SSLContext


class Mesh:
    """A mesh CA in tmp_path and the ssl contexts a client builds from it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dir = tmp_path / "ca"
        init_ca(TRUST_DOMAIN, self.dir)
        self.ca = load_ca(self.dir)
        self.root_pem = (self.dir / "ca.crt").read_text()
        self._files = 0

    def trusting(self) -> ssl.SSLContext:
        """A client context trusting only ca.crt, hostname checked (the server cert names 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.dir / "ca.crt"))

    def presenting(self, key: ec.EllipticCurvePrivateKey, cert_pem: bytes) -> Workload:
        self._files += 1
        cert_file, key_file = self.tmp / f"client-{self._files}.crt", self.tmp / f"client-{self._files}.key"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        context = self.trusting()
        context.load_cert_chain(cert_file, key_file)
        return Workload(key, cert_pem, context)

    def svid(self, service: str, *, ca: MeshCA | None = None) -> Workload:
        """A workload certificate for `service` signed directly (by this CA or `ca`)."""
        key, csr = make_csr(service)
        now = datetime.now(UTC)
        return self.presenting(key, issue_svid(ca or self.ca, csr, service=service, lifetime=LIFETIME, now=now))


def make_csr(service: str, *, uri_service: str | None = None) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new ECDSA P-256 key and a CSR asking for spiffe://cluster.local/service/<uri_service or service>."""
    key = ec.generate_private_key(ec.SECP256R1())
    uri = f"spiffe://{TRUST_DOMAIN}/service/{uri_service or service}"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def forge_without_uri(mesh: Mesh) -> Workload:
    """A client certificate the mesh CA signed that the TLS handshake accepts (chain, clientAuth)
    but that is no SVID: no URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reviews")]))
        .issuer_name(mesh.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("reviews")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(mesh.ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return mesh.presenting(key, cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path)


class Api:
    """A started ControlPlane with mesh identity, and calls to its HTTPS API."""

    def __init__(self, plane: ControlPlane, http: aiohttp.ClientSession, mesh: Mesh) -> None:
        self.plane, self.http, self.mesh = plane, http, mesh

    def url(self, path: str) -> str:
        return f"https://{self.plane.address}{path}"

    async def call(
        self, method: str, path: str, body: object = None, *, as_: Workload | None = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        context = self.mesh.trusting() if as_ is None else as_.context
        data = None if body is None else json.dumps(body).encode()
        async with self.http.request(method, self.url(path), data=data, headers=headers, ssl=context) as response:
            raw = await response.read()
            return response.status, json.loads(raw) if response.content_type == "application/json" else raw.decode()

    async def certificate(
        self, service: str, csr: bytes, *, as_: Workload | None = None, token: str | None = None
    ) -> tuple[int, Any]:
        return await self.call("POST", "/v1/certificates", {"service": service, "csr": csr.decode()}, as_=as_, token=token)

    async def join(self, service: str) -> Workload:
        """What a proxy does at its first start: a key, a CSR, the join token."""
        key, csr = make_csr(service)
        status, answer = await self.certificate(service, csr, token=TOKEN)
        assert status == 200, answer
        return self.mesh.presenting(key, answer["certificate"].encode())


@asynccontextmanager
async def serving(tmp_path: Path, h: Any, mesh: Mesh, **changes: Any) -> AsyncIterator[Api]:
    repo = h.make_repo(tmp_path / "policy")
    h.commit(repo, {"mesh.star": h.policy("v1")})
    keys = h.keys(tmp_path / "keys")
    config = ControlPlaneConfig(
        repo=str(repo), key=keys.private, state_dir=tmp_path / "state", listen="127.0.0.1:0",
        poll_interval=3600, ca=mesh.dir, join_token=TOKEN, cert_lifetime=LIFETIME,
    )  # fmt: skip
    plane = ControlPlane(config, out=io.StringIO())
    if changes:
        assert plane.identity is not None
        plane.identity = dataclasses.replace(plane.identity, **changes)
    try:
        await plane.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
            yield Api(plane, http, mesh)
    finally:
        await plane.stop()


def svid_service(pem: str, mesh: Mesh, usage: Any = "client") -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return verify_svid([der], [mesh.ca.certificate], trust_domain=TRUST_DOMAIN, now=datetime.now(UTC), usage=usage)


def test_a_proxy_joins_with_the_token_and_renews_with_its_certificate(tmp_path: Path, h: Any, mesh: Mesh) -> None:
    async def main() -> None:
        async with serving(tmp_path, h, mesh) as api:
            key, csr = make_csr("reviews")
            status, answer = await api.certificate("reviews", csr, token=TOKEN)
            assert status == 200, answer
            assert svid_service(answer["certificate"], mesh) == "reviews"
            assert svid_service(answer["certificate"], mesh, usage="server") == "reviews"
            assert answer["ca"] == mesh.root_pem
            issued = x509.load_pem_x509_certificate(answer["certificate"].encode())
            assert issued.public_key() == key.public_key(), "the CSR's key, never one the control plane made"
            assert answer["expires_at"] == issued.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            assert issued.not_valid_after_utc - issued.not_valid_before_utc == LIFETIME + timedelta(minutes=1)

            # Renewal: a new key, the current certificate as the client certificate, no token.
            current = mesh.presenting(key, answer["certificate"].encode())
            new_key, new_csr = make_csr("reviews")
            status, renewed = await api.certificate("reviews", new_csr, as_=current)
            assert status == 200, renewed
            assert svid_service(renewed["certificate"], mesh) == "reviews"
            assert x509.load_pem_x509_certificate(renewed["certificate"].encode()).public_key() == new_key.public_key()
            # A wrong token does not spoil a renewal by a valid certificate (the token may have been rotated).
            status, _ = await api.certificate("reviews", make_csr("reviews")[1], as_=current, token="x" * 20)
            assert status == 200

            # A certificate renews only its own service.
            status, refused = await api.certificate("ratings", make_csr("ratings")[1], as_=current)
            assert status == 403 and "service 'reviews''s, which renews only its own" in refused["error"]

    h.run(main)


def test_certificates_are_refused_without_the_token_or_for_a_bad_csr(tmp_path: Path, h: Any, mesh: Mesh) -> None:
    async def main() -> None:
        async with serving(tmp_path, h, mesh) as api:
            _, csr = make_csr("reviews")
            refusals = [
                ({}, "no Authorization header was sent"),
                ({"token": "not-the-token-000000"}, "the join token is wrong"),
                ({"token": TOKEN[:-1]}, "the join token is wrong"),
                ({"as_": forge_without_uri(mesh)}, "not a valid SVID of this mesh"),
            ]
            for how, reason in refusals:
                status, answer = await api.certificate("reviews", csr, **how)
                assert status == 401 and reason in answer["error"], (how, answer)
                assert "Authorization: Bearer <join token>" in answer["error"]
            async with api.http.post(
                api.url("/v1/certificates"), json={"service": "reviews", "csr": csr.decode()},
                headers={"authorization": f"Basic {TOKEN}"}, ssl=mesh.trusting(),
            ) as response:  # fmt: skip
                assert response.status == 401 and response.headers["www-authenticate"].startswith("Bearer")
                assert "is not `Bearer <join token>`" in (await response.json())["error"]

            bad = [
                ("reviews", make_csr("reviews", uri_service="ratings")[1], 400, "it must ask for exactly the URI"),
                ("Reviews", csr, 400, "invalid service name 'Reviews'"),
                ("reviews", b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", 400, "not a PEM certificate request"),
                ("reviews", b"x" * (MAX_CSR_BYTES + 1), 413, f"at most {MAX_CSR_BYTES}"),
            ]
            for service, body, code, message in bad:
                status, answer = await api.certificate(service, body, token=TOKEN)
                assert status == code and message in answer["error"], (service, answer)
            status, answer = await api.call("POST", "/v1/certificates", {"service": "reviews"}, token=TOKEN)
            assert status == 400 and "invalid certificate request" in answer["error"]

    h.run(main)


async def refused(api: Api, path: str, workload: Workload) -> str:
    """How a proxy route answers `workload`: "handshake" when TLS itself refused it, else the 401's error."""
    try:
        status, answer = await api.call("GET", path, as_=workload)
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return "handshake"
    assert status == 401, (status, answer)
    return str(answer["error"])


def test_the_proxy_routes_need_a_valid_client_svid(tmp_path: Path, h: Any, mesh: Mesh) -> None:
    async def main() -> None:
        async with serving(tmp_path, h, mesh) as api:
            reviews, ratings = await api.join("reviews"), await api.join("ratings")
            await h.until(lambda: api.plane.ledger.current() is not None, "the first release")
            for path, served in (("/v1/endpoints?wait=0", 204), ("/v1/release?after=0&wait=0", 200)):
                status, answer = await api.call("GET", path)
                assert status == 401 and "no client certificate was presented" in answer["error"], (path, answer)
                assert (await api.call("GET", path, as_=reviews))[0] == served, path  # 204: no proxy yet
            status, envelope = await api.call("GET", "/v1/release?after=0&wait=0", as_=reviews)
            bundle = json.loads(base64.b64decode(envelope["payload"]))["bundle"]
            assert (await api.call("GET", f"/v1/bundles/{bundle}"))[0] == 200  # open like /v1/status (starmesh diff --against)
            assert (await api.call("GET", f"/v1/bundles/{bundle}", as_=ratings))[0] == 200

            # Registration: only as the certificate's service, only for that service's proxy ids.
            assert (await api.call("POST", "/v1/proxies/r1", HEARTBEAT))[0] == 401
            assert api.plane.registry.get("r1") is None
            status, answer = await api.call("POST", "/v1/proxies/r1", HEARTBEAT, as_=ratings)
            assert status == 403 and "cannot register proxy r1 as service 'reviews'" in answer["error"]
            assert (await api.call("POST", "/v1/proxies/r1", HEARTBEAT, as_=reviews))[0] == 200
            taken = {**HEARTBEAT, "service": "ratings"}
            status, answer = await api.call("POST", "/v1/proxies/r1", taken, as_=ratings)
            assert status == 403 and "proxy r1 is registered as service 'reviews'" in answer["error"]
            report = {"version": 1, "bundle": bundle, "error": "x"}
            status, answer = await api.call("POST", "/v1/proxies/r1/status", report, as_=ratings)
            assert status == 403 and "cannot speak for it" in answer["error"]
            entry = api.plane.registry.get("r1")
            assert entry is not None and entry.service == "reviews" and entry.error is None

            # Certificates that are not this mesh's SVIDs.
            other = Mesh(tmp_path / "other")
            assert await refused(api, "/v1/endpoints?wait=0", other.svid("reviews")) == "handshake"
            assert "has 0 URI SANs" in await refused(api, "/v1/endpoints?wait=0", forge_without_uri(mesh))

            # The operators' routes stay open.
            for path in ("/healthz", "/readyz", "/v1/status"):
                assert (await api.call("GET", path))[0] == 200, path
            status, answer = await api.call("POST", "/v1/rollback", {"to": "sha256:" + "0" * 64})
            assert status == 404 and "cannot roll back" in answer["error"]

    h.run(main)


def test_an_svid_past_its_validity_is_refused_by_the_api(tmp_path: Path, h: Any, mesh: Mesh) -> None:
    """The API's own check, not just the handshake's: its clock is a day ahead of ssl's."""
    later = datetime.now(UTC) + timedelta(days=1)

    async def main() -> None:
        async with serving(tmp_path, h, mesh, clock=lambda: later) as api:
            reviews = mesh.svid("reviews")
            assert "expired" in await refused(api, "/v1/endpoints?wait=0", reviews)
            status, answer = await api.certificate("reviews", make_csr("reviews")[1], as_=reviews)
            assert status == 401 and "expired" in answer["error"]

    h.run(main)


def test_the_server_certificate_is_renewed_at_half_life(mesh: Mesh) -> None:
    clock = [datetime.now(UTC)]
    tls = ServerTLS(mesh.ca, ["127.0.0.1"], lifetime=timedelta(hours=1), clock=lambda: clock[0], check_interval=0.05)
    issued = datetime.now(UTC)
    assert issued < tls.renew_at < issued + timedelta(minutes=30) < tls.expires_at <= issued + timedelta(hours=1, seconds=1)

    async def served_serial(port: int) -> int:
        pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port), ca_certs=str(mesh.dir / "ca.crt"))
        return int(x509.load_pem_x509_certificate(pem.encode()).serial_number)

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=tls.context)
        renewing = asyncio.get_running_loop().create_task(tls.renew_forever())
        try:
            port = server.sockets[0].getsockname()[1]
            before = await served_serial(port)
            await asyncio.sleep(0.1)
            assert await served_serial(port) == before, "not renewed before half life"
            clock[0] = tls.renew_at + timedelta(seconds=1)
            end = asyncio.get_running_loop().time() + DEADLINE
            while await served_serial(port) == before:  # new connections get the renewed certificate
                assert asyncio.get_running_loop().time() < end, "never renewed"
                await asyncio.sleep(0.05)
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_without_a_ca_no_certificates_are_issued(tmp_path: Path, h: Any) -> None:
    repo = h.make_repo(tmp_path / "policy")
    h.commit(repo, {"mesh.star": h.policy("v1")})
    config = ControlPlaneConfig(
        repo=str(repo), key=h.keys(tmp_path / "keys").private, state_dir=tmp_path / "state", listen="127.0.0.1:0"
    )

    async def main() -> None:
        plane = ControlPlane(config, out=io.StringIO())
        try:
            await plane.start()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
                body = {"service": "reviews", "csr": make_csr("reviews")[1].decode()}
                async with http.post(f"http://{plane.address}/v1/certificates", json=body) as response:
                    assert response.status == 404
                    assert "runs without --ca" in (await response.json())["error"]
                async with http.get(f"http://{plane.address}/v1/endpoints?wait=0") as response:
                    assert response.status == 204, "the proxy routes are open without --ca"
        finally:
            await plane.stop()

    h.run(main)
