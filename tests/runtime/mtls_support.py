"""A real test CA, SVIDs (good and deliberately bad), and ssl contexts, for the mTLS tests.

Loaded by path (runpy) from tests/runtime/test_mtls.py and tests/runtime/e2e/test_mtls.py:
in importlib mode test modules cannot import one another.

    ca = MeshTestCA.create(tmp_path / "ca")              # reconciler/ca.py's init_ca
    good = ca.svid("reviews")                            # issue_svid from a real CSR
    bad = ca.forged("reviews", ca_flag=True)             # the CA's key, a profile verify_svid refuses
    other = MeshTestCA.create(tmp_path / "other")        # another mesh's root
    contexts = Contexts(ca.cert, good)                   # a WorkloadContexts (runtime/tls.py)
    node = Node("reviews", contexts, app)                # one service's proxy parts, in process
    await node.start(ca.cert); await node.apply(bundle)
    with BackgroundNode(ca, good, policy_bundle) as bg:  # the same on a uvloop thread (for
        bg.inbound                                       # outside clients: curl, openssl)
"""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from starmesh.compiler.compile import compile_tree
from starmesh.reconciler.ca import MeshCA, init_ca, issue_svid, load_ca
from starmesh.runtime.apply import Applier
from starmesh.runtime.chain import ChainDeps, OutboundMTLS
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.server import start_listener
from starmesh.runtime.message import Request, Response, proxy_response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.tls import InboundTLS, MeshListener, MeshTLS

TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Credential:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class MeshTestCA:
    """A mesh root made by `init_ca`, and the leaves it signs into `directory`."""

    directory: Path
    ca: MeshCA

    @classmethod
    def create(cls, directory: Path, trust_domain: str = TRUST_DOMAIN) -> MeshTestCA:
        init_ca(trust_domain, directory)
        return cls(directory, load_ca(directory))

    @property
    def cert(self) -> Path:
        return self.directory / "ca.crt"

    def _write(self, name: str, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> Credential:
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        return Credential(cert_path, key_path)

    def svid(self, service: str, name: str | None = None) -> Credential:
        """A good SVID for `service`, issued the way the control plane issues one (a CSR)."""
        key = ec.generate_private_key(ec.SECP256R1())
        uri = f"spiffe://{self.ca.trust_domain}/service/{service}"
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem = issue_svid(
            self.ca,
            csr.public_bytes(serialization.Encoding.PEM),
            service=service,
            lifetime=timedelta(hours=1),
            now=datetime.now(UTC),
        )
        return self._write(name or service, pem, key)

    def forged(
        self,
        service: str,
        *,
        name: str,
        ca_flag: bool = False,
        uris: tuple[str, ...] | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Credential:
        """A leaf signed by this CA's key with one thing wrong (or right: all defaults)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        names = uris if uris is not None else (f"spiffe://{self.ca.trust_domain}/service/{service}",)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=1))
            .not_valid_after(not_after or now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        )
        cert = builder.sign(self.ca.key, hashes.SHA256())  # type: ignore[arg-type]
        return self._write(name, cert.public_bytes(serialization.Encoding.PEM), key)


def client_context(ca: Path, credential: Credential | None = None) -> ssl.SSLContext:
    """A test client's context: trusts `ca`, presents `credential` when given, no hostname check."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca))
    if credential is not None:
        context.load_cert_chain(str(credential.cert), str(credential.key))
    return context


class Contexts:
    """A WorkloadContexts (runtime/tls.py) over PEM files, as runtime/workload.py provides one.

    `use(credential)` is a rotation: contexts asked for afterwards carry the new certificate."""

    def __init__(self, ca: Path, credential: Credential) -> None:
        self.ca = ca
        self.credential = credential
        self.asked = 0

    def use(self, credential: Credential) -> None:
        self.credential = credential

    def server_context(self) -> ssl.SSLContext:
        self.asked += 1
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.ca))
        context.load_cert_chain(str(self.credential.cert), str(self.credential.key))
        return context

    def client_context(self) -> ssl.SSLContext:
        self.asked += 1
        return client_context(self.ca, self.credential)


# -- in-process proxy parts ----------------------------------------------------------------------


@asynccontextmanager
async def echo_app() -> AsyncIterator[str]:
    """An app answering 200 with the request's headers as JSON: [[name, value], ...]."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"headers": [[k.lower(), v] for k, v in request.headers.items()]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


def address(listener: asyncio.Server | MeshListener) -> str:
    host, port = listener.sockets[0].getsockname()[:2]
    return f"{host}:{port}"


@dataclass
class Node:
    """One service's proxy parts, wired as runtime/proxy.py wires them with a workload identity."""

    service: str
    contexts: Any
    app: str
    pool: UpstreamPool = field(init=False)
    applier: Applier = field(init=False)
    tls: InboundTLS = field(init=False)
    recorder: MemoryRecorder = field(default_factory=MemoryRecorder)
    inbound: str = ""
    outbound: str = ""
    listeners: list[Any] = field(default_factory=list)

    async def start(self, ca: Path) -> None:
        mesh = MeshTLS.from_ca_pem(self.contexts, ca.read_bytes())
        self.pool = UpstreamPool()
        endpoints = Endpoints()
        deps = ChainDeps(
            pool=self.pool,
            endpoints=endpoints,
            state=StateRegistry(),
            recorder=self.recorder,
            local_service=self.service,
            local_version="v1",
            rng=random.Random(1),
            mtls=OutboundMTLS(self.pool, mesh, endpoints),
        )
        self.applier = applier = Applier(deps, app=self.app, state_dir=None)
        self.tls = InboundTLS(mesh, lambda: None if applier.current is None else applier.current.inbound_policy)

        def inbound(request: Request) -> Any:
            table = applier.current
            return table.inbound(request) if table is not None else _not_ready()

        def outbound(request: Request) -> Any:
            table = applier.current
            return table.outbound(request) if table is not None else _not_ready()

        mesh_listener = await start_listener("127.0.0.1", 0, inbound, side="inbound", tls=self.tls)
        plain = await start_listener("127.0.0.1", 0, outbound, side="outbound")
        self.listeners = [mesh_listener, plain]
        self.inbound, self.outbound = address(mesh_listener), address(plain)

    async def apply(self, bundle: bytes, registered: dict[str, dict[str, list[str]]] | None = None) -> None:
        table = {s: {v: tuple(a) for v, a in versions.items()} for s, versions in (registered or {}).items()}
        result = await self.applier.apply(bundle, expected_digest=None, release_version=None, origin="file", endpoints=table)
        assert result.ok, result.error

    async def close(self) -> None:
        for listener in self.listeners:
            listener.close()
            await listener.wait_closed()
        await self.pool.close()


async def _not_ready() -> Response:
    return proxy_response(503, "not-ready")


def compile_policy(root: Path, text: str) -> bytes:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mesh.star").write_text(text)
    result = compile_tree(root)
    assert result.data is not None, result.findings
    return result.data


class BackgroundNode:
    """A Node (with its echo app) on a uvloop loop in a thread, for clients outside the process."""

    def __init__(self, ca: Path, credential: Credential, bundle: bytes, service: str = "reviews") -> None:
        self.ca, self.credential, self.bundle, self.service = ca, credential, bundle, service
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"node-{service}", daemon=True)
        self.node: Node | None = None
        self._app: Any = None

    def __enter__(self) -> Node:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> Node:
        self._app = echo_app()
        app = await self._app.__aenter__()
        node = self.node = Node(self.service, Contexts(self.ca, self.credential), app)
        await node.start(self.ca)
        await node.apply(self.bundle)
        return node

    async def _stop(self) -> None:
        if self.node is not None:
            await self.node.close()
        if self._app is not None:
            await self._app.__aexit__(None, None, None)

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()
