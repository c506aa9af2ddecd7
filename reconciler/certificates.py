"""Mesh identity on the control plane: its HTTPS, who may get a certificate, who is calling.

With `--ca DIR --join-token TOKEN` the API is served over TLS, and the mesh CA vouches
for both ends:

    proxy ══TLS (server cert from the mesh CA; the proxy's SVID, optional)══► control plane
      │
      │ POST /v1/certificates {"service", "csr"}        issue_route
      │   Authorization: Bearer <join token>   bootstrap: any service, token compared
      │                                        in constant time
      │   or its current SVID (client cert)    renewal: the SVID's own service only (403)
      │   neither ─► 401 saying what was missing  ─► issue_svid(ca, csr, service, lifetime)
      │
      │ GET  /v1/release, /v1/endpoints                  require_svid: a valid client SVID
      │ POST /v1/proxies/*                               (verify_svid, usage client), else 401;
      │                                                  its service is request[PEER_SERVICE];
      │                                                  caller_mismatch: it speaks only for
      │                                                  its own service's proxies (403)
      │
      │ GET /healthz, /readyz, /v1/status; POST /v1/rollback    open: the operators' routes

The handshake asks for a client certificate (CERT_OPTIONAL) and checks any it gets
against the mesh root, so a certificate from another CA fails the handshake itself;
`verify_svid` then checks every SVID rule on the leaf (trust domain, URI SAN, usage),
which `ssl` cannot. Nothing here trusts a header for identity.

`ServerTLS` holds the server side's `ssl.SSLContext`: a certificate from
`server_certificate` for the listen host, re-issued into the same context at half
life (`renew_forever`), so connections made later get the fresh one.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.identity import verify_svid
from starmesh.bundle.release import format_time
from starmesh.reconciler.ca import DEFAULT_LIFETIME, MeshCA, issue_svid, server_certificate
from starmesh.reconciler.errors import CAError

__all__ = [
    "DEFAULT_CERT_LIFETIME",
    "MAX_CSR_BYTES",
    "MIN_JOIN_TOKEN",
    "PEER_SERVICE",
    "SERVER_CERT_LIFETIME",
    "MeshIdentity",
    "ServerTLS",
    "caller_mismatch",
    "check_join_token",
    "issue_route",
    "peer_service",
    "require_svid",
    "server_hosts",
]

DEFAULT_CERT_LIFETIME = DEFAULT_LIFETIME  # a proxy certificate: 24 h unless --cert-lifetime
SERVER_CERT_LIFETIME = timedelta(days=30)
MIN_JOIN_TOKEN = 16
_MAX_JOIN_TOKEN = 1024
MAX_CSR_BYTES = 16 * 1024  # an ECDSA P-256 CSR is under 1 KiB in PEM, an RSA-4096 one under 4 KiB
_DNS_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?")
_RENEW_RETRY = 60.0
_RENEW_PAUSE = 1.0

PEER_SERVICE = web.RequestKey("starmesh_peer_service", str)
"""The service named by the caller's verified client SVID (set by `require_svid`)."""

log = logging.getLogger("starmesh.control_plane")


def check_join_token(token: str) -> str:
    """The join token, if usable: 16 to 1024 visible ASCII characters (it travels in an
    `Authorization: Bearer` header). ValueError saying why not."""
    if len(token) < MIN_JOIN_TOKEN:
        raise ValueError(
            f"is {len(token)} characters; give at least {MIN_JOIN_TOKEN} random ones "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if len(token) > _MAX_JOIN_TOKEN:
        raise ValueError(f"is {len(token)} characters; at most {_MAX_JOIN_TOKEN}")
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError("must be visible ASCII without spaces (it is sent in an HTTP header)")
    return token


@dataclass(frozen=True)
class MeshIdentity:
    """What the API needs to issue and check SVIDs: the mesh CA, the join token, the
    lifetime of the certificates it issues, and the clock they are checked at."""

    ca: MeshCA
    join_token: str = field(repr=False)  # a secret: kept out of reprs and tracebacks
    cert_lifetime: timedelta = DEFAULT_CERT_LIFETIME
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    @functools.cached_property
    def ca_pem(self) -> str:
        """The mesh root as PEM: what an issued certificate chains to (`ca` in the answer)."""
        return self.ca.certificate.public_bytes(Encoding.PEM).decode("ascii")

    def token_matches(self, presented: str) -> bool:
        """Whether `presented` is the join token, compared in constant time."""
        return hmac.compare_digest(presented.encode("utf-8"), self.join_token.encode("utf-8"))


class _CertificateRequest(msgspec.Struct, frozen=True):
    service: str
    csr: str


def peer_service(request: web.Request, identity: MeshIdentity) -> tuple[str | None, str]:
    """(service, "") of the caller's client certificate when it is a valid SVID of this
    mesh, else (None, why not)."""
    transport = request.transport
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None, "the connection is not TLS"
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None, "no client certificate was presented"
    ca = identity.ca
    try:
        service = verify_svid([der], [ca.certificate], trust_domain=ca.trust_domain, now=identity.clock(), usage="client")
    except IdentityError as exc:
        return None, f"the client certificate is not a valid SVID of this mesh: {exc}"
    return service, ""


def require_svid(identity: MeshIdentity) -> Callable[[Handler], Handler]:
    """A wrapper for the proxy routes: 401 unless the caller presents a valid client SVID;
    its service is then `request[PEER_SERVICE]` for the handler to check."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            service, why = peer_service(request, identity)
            if service is None:
                return _refusal(
                    401,
                    f"{request.method} {request.path} is for mesh proxies: {why}; present the proxy's "
                    "workload certificate (issued by POST /v1/certificates) as the TLS client certificate",
                )
            request[PEER_SERVICE] = service
            return await handler(request)

        return guarded

    return wrap


def caller_mismatch(request: web.Request, proxy_id: str, *, claimed: str | None, registered: str | None) -> str | None:
    """Why a proxy route's caller may not speak for proxy `proxy_id` (403), or None.

    A caller speaks only as its certificate's service: it registers as that service
    (`claimed`), and only for a proxy id that is not another service's (`registered`).
    Without mesh identity (no `PEER_SERVICE`) anything goes."""
    peer = request.get(PEER_SERVICE)
    if peer is None:
        return None
    if claimed is not None and claimed != peer:
        return f"the client certificate is service {peer!r}'s: it cannot register proxy {proxy_id} as service {claimed!r}"
    if registered is not None and registered != peer:
        return (
            f"proxy {proxy_id} is registered as service {registered!r}; a certificate of service {peer!r} "
            "cannot speak for it (give each proxy its own --state-dir, so its own id)"
        )
    return None


class _Refused(Exception):
    """A certificate request refused: the JSON answer to send (inside this module only)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.response = _refusal(status, message, headers=headers)


def issue_route(identity: MeshIdentity) -> Handler:
    """`POST /v1/certificates {"service", "csr"}` ─► `{"certificate", "ca", "expires_at"}`."""

    async def issue(request: web.Request) -> web.StreamResponse:
        try:
            return await _issue(request, identity)
        except _Refused as refused:
            return refused.response

    return issue


async def _issue(request: web.Request, identity: MeshIdentity) -> web.Response:
    token_ok, token_why = _bearer(request, identity)
    peer, peer_why = (None, "") if token_ok else peer_service(request, identity)
    if not token_ok and peer is None:
        raise _Refused(
            401,
            f"a certificate needs the mesh's join token or a valid certificate of the service: {token_why}, "
            f"and {peer_why}; send `Authorization: Bearer <join token>` (the control plane's --join-token)",
            headers={"www-authenticate": 'Bearer realm="starmesh"'},
        )
    asked = await _read_request(request)
    if peer is not None and asked.service != peer:
        raise _Refused(
            403,
            f"the client certificate is service {peer!r}'s, which renews only its own certificate, not "
            f"service {asked.service!r}'s; a proxy of another service joins with the join token",
        )
    try:
        pem = issue_svid(
            identity.ca,
            asked.csr.encode("utf-8"),
            service=asked.service,
            lifetime=identity.cert_lifetime,
            now=identity.clock(),
        )
    except (CAError, IdentityError) as exc:
        raise _Refused(400, f"cannot issue a certificate for service {asked.service!r}: {exc}") from None
    issued = x509.load_pem_x509_certificate(pem)
    expires_at = format_time(issued.not_valid_after_utc)
    log.info(
        "issued a certificate for service %s (serial %x, by %s, to %s) valid until %s",
        asked.service, issued.serial_number, "join token" if peer is None else "renewal", request.remote, expires_at,
    )  # fmt: skip
    document = {"certificate": pem.decode("ascii"), "ca": identity.ca_pem, "expires_at": expires_at}
    return web.Response(body=msgspec.json.encode(document), content_type="application/json")


def _bearer(request: web.Request, identity: MeshIdentity) -> tuple[bool, str]:
    """(True, "") when the request carries the join token, else (False, why not)."""
    header = request.headers.get("authorization")
    if header is None:
        return False, "no Authorization header was sent"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False, "the Authorization header is not `Bearer <join token>`"
    if not identity.token_matches(token.strip()):
        return False, "the join token is wrong"
    return True, ""


async def _read_request(request: web.Request) -> _CertificateRequest:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Refused(413, f"the certificate request is too large: send one CSR of at most {MAX_CSR_BYTES} bytes") from None
    try:
        asked = msgspec.json.decode(raw, type=_CertificateRequest)
    except msgspec.ValidationError as exc:
        raise _Refused(400, f'invalid certificate request: {exc}; send {{"service": NAME, "csr": PEM}}') from None
    except msgspec.DecodeError as exc:
        raise _Refused(400, f"the certificate request is not JSON: {exc}") from None
    if len(asked.csr) > MAX_CSR_BYTES:
        raise _Refused(413, f"the CSR is {len(asked.csr)} bytes; at most {MAX_CSR_BYTES} (use an ECDSA P-256 key)")
    return asked


def _refusal(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    body = msgspec.json.encode({"error": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# -- the server's own certificate ----------------------------------------------------------


def server_hosts(listen_host: str, advertised: str | None = None) -> list[str]:
    """The names the server certificate covers: the listen host (a wildcard address
    stands for this machine's name), the host other replicas reach it at (`--advertise-url`)
    and the loopback names."""
    wildcard = listen_host in ("", "0.0.0.0", "::")  # noqa: S104 - recognising, not binding
    machine = socket.gethostname()
    first = ([machine] if _DNS_NAME.fullmatch(machine) else []) if wildcard else [listen_host]
    hosts: list[str] = []
    for host in [*first, *([advertised] if advertised else []), "localhost", "127.0.0.1", "::1"]:
        if host and host not in hosts:
            hosts.append(host)
    return hosts


class ServerTLS:
    """The API's server-side TLS: a mesh-CA server certificate for `hosts`, client
    certificates optional and checked against the mesh root, TLS 1.2 or newer."""

    def __init__(
        self,
        ca: MeshCA,
        hosts: Sequence[str],
        *,
        lifetime: timedelta = SERVER_CERT_LIFETIME,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        check_interval: float = 3600.0,
    ) -> None:
        """`check_interval`: seconds between looks at `clock` while waiting for half life."""
        self.ca, self.hosts, self.lifetime, self.clock = ca, list(hosts), lifetime, clock
        self.check_interval = check_interval
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=ca.certificate.public_bytes(Encoding.PEM).decode("ascii"))
        self.context = context
        self.expires_at = self.renew_at = self.clock()
        self.renew()

    def renew(self) -> None:
        """Issue a new server certificate into the context (later handshakes present it)."""
        try:
            cert_pem, key_pem = server_certificate(self.ca, self.hosts, lifetime=self.lifetime)
        except CAError as exc:
            raise CAError(f"cannot issue the control plane's server certificate for {self.hosts}: {exc}") from exc
        # ssl loads a certificate and key from files only: a private directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="starmesh-tls-") as private:
            cert_file, key_file = Path(private) / "server.crt", Path(private) / "server.key"
            cert_file.write_bytes(cert_pem)
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem)
            self.context.load_cert_chain(cert_file, key_file)
        issued = x509.load_pem_x509_certificate(cert_pem)
        self.expires_at = issued.not_valid_after_utc
        self.renew_at = issued.not_valid_before_utc + (self.expires_at - issued.not_valid_before_utc) / 2
        log.info("server certificate for %s valid until %s", ", ".join(self.hosts), format_time(self.expires_at))

    async def renew_forever(self) -> None:
        """Renew at half life, for as long as the task runs (cancel it to stop); a failed
        renewal is retried every minute while the current certificate lasts."""
        while True:
            left = (self.renew_at - self.clock()).total_seconds()
            if left > 0:
                await asyncio.sleep(min(left, self.check_interval))
                continue
            try:
                self.renew()
            except (CAError, ssl.SSLError, OSError) as exc:
                log.error("renewing the server certificate failed (retrying in a minute): %s", exc)
                await asyncio.sleep(_RENEW_RETRY)
            else:
                await asyncio.sleep(_RENEW_PAUSE)  # never a tight loop, whatever the clock says
