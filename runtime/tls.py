"""Mutual TLS on the data plane: which connections are TLS, and what a peer's certificate proves.

    inbound   the local service's effective mode (service(mtls=) else mesh's), read per connection
      strict      first byte 0x16 ─► TLS, client cert required ─► SVID (usage client) ─► request.source
                  anything else   ─► closed
      permissive  first byte 0x16 ─► as strict;  anything else ─► plaintext, no identity
      disable     plaintext
    outbound  the destination service's effective mode, fixed when the route table is built
      strict      every endpoint: TLS with the workload cert; the server's SVID must name the service
      permissive  endpoints registered by proxies: as strict; static `endpoints=`: plaintext
      disable     plaintext

A mesh listener accepts sockets itself so that each connection can go its own way:

    sock_accept ─► peek 1 byte (bounded wait) ─► loop.connect_accepted_socket(ssl=ctx | None)
                ─► connection_made: identify(transport) = verify_svid(...) ─► request.source

Identity is checked once per connection, right after the handshake, by `verify_svid`
(never the CN, never ssl's hostname check); a failure closes the connection and is
logged once per peer and reason (bounded). Plaintext connections on a mesh listener are
answered 403 `denied` once the mode has become strict. Contexts are asked for at each
handshake (`WorkloadContexts`), so a rotated certificate is used from the next
connection on. The calling side (runtime/chain.py's `OutboundMTLS`) pools TLS
connections apart from plaintext ones, per expected identity (`UpstreamPool.originating`),
and checks the server's SVID with `MeshTLS.peer_service`: requests do no TLS work of
their own. Without a workload identity none of this is built: everything is plaintext.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.spec import MtlsMode
from starmesh.runtime.errors import PeerRefused
from starmesh.runtime.message import Request, Response, proxy_response

if TYPE_CHECKING:  # X.509 (cryptography) is imported when a MeshTLS is used: never in plaintext
    from cryptography import x509

    from starmesh.bundle.identity import Usage

__all__ = [
    "InboundPolicy",
    "InboundTLS",
    "MeshListener",
    "MeshTLS",
    "PeerRefused",  # runtime/errors.py's, re-exported: runtime/http/server.py imports it from here
    "WorkloadContexts",
]

log = logging.getLogger("starmesh.proxy")

_TLS_HANDSHAKE = 0x16
"""The first byte of a TLS record carrying a handshake (a ClientHello)."""
_MAX_STARTING = 512
"""Connections between accept and the end of their handshake; more are closed at once."""
_LOG_EVERY = 60.0
_LOG_KEYS = 1024
_LOG_BURST = 100
"""Refusals are logged once per (peer, reason) every _LOG_EVERY s, at most _LOG_BURST lines per period."""


class WorkloadContexts(Protocol):
    """The proxy's workload identity (runtime/workload.py): contexts with the current certificate,
    trusting only the mesh root, `check_hostname=False`, `verify_mode=CERT_REQUIRED`."""

    def server_context(self) -> ssl.SSLContext: ...

    def client_context(self) -> ssl.SSLContext: ...


@dataclass(frozen=True)
class InboundPolicy:
    """What the inbound listener enforces: the local service's effective mode and the trust domain."""

    mode: MtlsMode
    trust_domain: str


@dataclass(frozen=True)
class MeshTLS:
    """The workload identity as the data plane uses it: the contexts and the mesh roots."""

    contexts: WorkloadContexts
    roots: tuple[x509.Certificate, ...]
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    @classmethod
    def from_ca_pem(cls, contexts: WorkloadContexts, ca_pem: bytes) -> MeshTLS:
        """From `--ca-cert`'s bytes, the mesh root(s); IdentityError when they hold no certificate."""
        from starmesh.bundle.identity import load_certificates

        return cls(contexts, tuple(load_certificates(ca_pem)))

    def peer_service(self, transport: asyncio.BaseTransport, trust_domain: str, usage: Usage) -> str:
        """The service a TLS peer's SVID names; IdentityError saying which rule failed."""
        from starmesh.bundle.identity import verify_svid  # once per handshake, not per request

        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise IdentityError("the peer presented no certificate")
        return verify_svid([der], self.roots, trust_domain=trust_domain, now=self.now(), usage=usage)

    def root_trust_domain(self) -> str | None:
        """The trust domain the mesh root names (its `spiffe://<td>` URI SAN), if it names one."""
        from cryptography import x509

        from starmesh.bundle.identity import SPIFFE_SCHEME, check_trust_domain

        for root in self.roots:
            try:
                sans = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                continue
            for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
                if uri.startswith(SPIFFE_SCHEME):
                    try:
                        return check_trust_domain(uri[len(SPIFFE_SCHEME) :].rstrip("/"))
                    except IdentityError:
                        continue
        return None


async def _answer(response: Response) -> Response:
    return response


class InboundTLS:
    """The inbound side's mTLS: the mode per connection, identity per handshake, refusals.

    `policy()` is the live table's InboundPolicy (None before any config: then plaintext
    and TLS are both accepted, with the trust domain the mesh root names, since nothing
    is served before a config anyway). `accepted` (per transport) and `refused` (per
    reason) count connections; runtime/otel_gauges.py reports them as metrics."""

    def __init__(
        self, mesh: MeshTLS, policy: Callable[[], InboundPolicy | None], *, handshake_timeout: float = 10.0
    ) -> None:
        self.mesh = mesh
        self._policy = policy
        self.handshake_timeout = handshake_timeout
        self._before_config = InboundPolicy("permissive", mesh.root_trust_domain() or "")
        self.accepted = {"mtls": 0, "plaintext": 0}
        self.refused: dict[str, int] = {}
        self._logged: dict[tuple[str, str], float] = {}
        self._period = (0.0, 0)

    def current(self) -> InboundPolicy:
        """The policy for a new connection."""
        return self._policy() or self._before_config

    def identify(self, transport: asyncio.BaseTransport) -> str:
        """The caller's service, from its client SVID; PeerRefused (logged) when it has none valid."""
        policy = self.current()
        if not policy.trust_domain:
            raise self.refuse(_peer_host(transport), "svid", "no config yet, and the mesh root names no trust domain")
        try:
            service = self.mesh.peer_service(transport, policy.trust_domain, "client")
        except IdentityError as exc:
            raise self.refuse(_peer_host(transport), "svid", str(exc)) from exc
        self.accepted["mtls"] += 1
        return service

    def guard(self, dispatch: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """`dispatch` for a plaintext connection: 403 once the mode has become strict."""
        current = self.current

        def plaintext(request: Request) -> Awaitable[Response]:
            if current().mode == "strict":
                why = "this service requires mTLS (strict); plaintext requests are refused"
                return _answer(proxy_response(403, "denied", why))
            return dispatch(request)

        return plaintext

    def refuse(self, address: str, reason: str, detail: str) -> PeerRefused:
        """Count and log (once per peer and reason, bounded) a refused connection; the error to raise."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        now = time.monotonic()
        start, lines = self._period
        if now - start >= _LOG_EVERY:
            self._period = start, lines = now, 0
            self._logged = {k: t for k, t in self._logged.items() if now - t < _LOG_EVERY}
        key = (address, reason)
        last = self._logged.get(key)
        if lines < _LOG_BURST and (last is None or now - last >= _LOG_EVERY) and len(self._logged) < _LOG_KEYS:
            self._logged[key] = now
            self._period = start, lines + 1
            log.warning("inbound connection from %s refused (%s): %s; more like it are not logged for %gs",
                        address, reason, detail, _LOG_EVERY)
        return PeerRefused(f"connection from {address} refused ({reason}): {detail}")


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "unknown peer"


Identify = Callable[[asyncio.Transport], str]
"""The caller's service, from its TLS connection (InboundTLS.identify); raises PeerRefused."""

ConnectionFactory = Callable[[Identify | None], asyncio.Protocol]
"""Makes the HTTP protocol for one connection, given how to identify its peer (None: plaintext)."""


class MeshListener:
    """A listening socket whose connections are TLS or plaintext per the mode at accept time.

    Quacks like the parts of asyncio.Server the proxy uses: `sockets`, `close`, `wait_closed`."""

    def __init__(self, sock: socket.socket, factory: ConnectionFactory, tls: InboundTLS) -> None:
        self.sockets: tuple[socket.socket, ...] = (sock,)
        self._sock = sock
        self._factory = factory
        self._tls = tls
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[None]] = set()
        self._accepting = self._loop.create_task(self._accept())

    @classmethod
    async def start(cls, host: str, port: int, factory: ConnectionFactory, tls: InboundTLS) -> MeshListener:
        """Bind `host:port` (its first address; OSError when it cannot) and start accepting."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, where = infos[0]
        sock = socket.create_server(where[:2], family=family, backlog=1024)
        sock.setblocking(False)
        return cls(sock, factory, tls)

    def is_serving(self) -> bool:
        return not self._accepting.done()

    def close(self) -> None:
        """Stop accepting and drop connections still in their handshake; open ones finish on their own."""
        self._accepting.cancel()
        for task in list(self._starting):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._starting, return_exceptions=True)

    async def _accept(self) -> None:
        loop = self._loop
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of file descriptors and the like: wait, then go on
                log.error("inbound listener: accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._starting) >= _MAX_STARTING:
                self._tls.refuse(str(address[0]), "overload", f"{_MAX_STARTING} handshakes in progress")
                conn.close()
                continue
            task = loop.create_task(self._start(conn, str(address[0])))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket, peer: str) -> None:
        """Peek, then hand the socket to the loop with or without TLS (it owns and closes it then)."""
        tls = self._tls
        context: ssl.SSLContext | None = None
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = tls.current().mode
            if mode != "disable":
                try:
                    first = await self._peek(conn, tls.handshake_timeout)
                except TimeoutError:
                    tls.refuse(peer, "timeout", f"nothing received within {tls.handshake_timeout:g}s")
                    conn.close()
                    return
                if not first:
                    conn.close()  # closed before saying anything: nothing to refuse
                    return
                if first[0] == _TLS_HANDSHAKE:
                    context = tls.mesh.contexts.server_context()
                elif mode == "strict":
                    tls.refuse(peer, "plaintext", "a plaintext connection, but this service requires mTLS (strict)")
                    conn.close()
                    return
        except BaseException as exc:
            conn.close()
            if isinstance(exc, Exception):  # e.g. no workload certificate yet: refuse, keep serving
                tls.refuse(peer, "handshake", f"{type(exc).__name__}: {exc}")
                return
            raise
        if context is None:
            tls.accepted["plaintext"] += 1
        identify = tls.identify if context is not None else None
        try:
            await self._loop.connect_accepted_socket(
                lambda: self._factory(identify), conn, ssl=context,
                ssl_handshake_timeout=tls.handshake_timeout if context is not None else None,
            )
        except Exception as exc:  # noqa: BLE001 - ssl.SSLError (an OSError), a reset, the handshake timeout
            tls.refuse(peer, "handshake", str(exc) or type(exc).__name__)  # (the transport closed the socket)

    async def _peek(self, conn: socket.socket, timeout: float) -> bytes:
        """The connection's first byte, left in the socket; b"" at EOF or after `timeout` s."""
        loop = self._loop
        fd = conn.fileno()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return conn.recv(1, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    pass
                readable = loop.create_future()
                loop.add_reader(fd, readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)
