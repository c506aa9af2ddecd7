"""The proxy's workload identity: its key and X.509-SVID from the control plane, renewed at half-life.

    load()    STATE_DIR/workload.key + workload.crt (workload_files.py): a valid certificate
              for this service is used at once, even past half-life (renewal then starts
              at once), so a restart works while the control plane is down; with none
              (or an expired one) the first certificate needs --join-token, else WorkloadError

    run()   ┌─► wait for half-life (renew_at), or the next expiry state change
            │   new ECDSA P-256 key + CSR for spiffe://<td>/service/<service>
            │   POST /v1/certificates {"service", "csr"}
            │        the current certificate as TLS client certificate (renewal), or
            │        `Authorization: Bearer <join token>` when there is no valid one
            │   ◄─ {"certificate", "ca", "expires_at"}
            │   accept: verify_svid against --ca-cert (client and server usage), this
            │        service, this key                  ── refused ─► jittered backoff, 1 s → 60 s
            │   save (0600, atomic) ─► contexts rebuilt ─► swapped in
            └─────────────────────────────────────────┘

Trust domain of a request, first that applies: the current certificate's (a renewal
keeps the identity); the one the mesh root names (its URI SAN `spiffe://<td>`, which
`starmesh ca init` writes, and the CA issues for no other); the applied bundle's
`mesh(trust_domain=)` (a root from elsewhere that names none); else `cluster.local`,
DESIGN.md's default. The first certificate is needed before any release can be fetched
(the control plane serves releases to certified proxies only), so the root comes before
the bundle. The answer is checked against the domain asked for.

Expiry: `valid` ─► `expiring` (less than a quarter of the lifetime left, not renewed) ─►
`expired`; each change is logged once (a warning, then an error). `expires_in()` is the
gauge `starmesh_certificate_expiry_seconds` (runtime/otel_gauges.py, through the control
link): seconds until the certificate's notAfter, negative once past, None before the first.

`server_context()` / `client_context()` (the data plane) and `control_plane_context()`
(the control-plane client's HTTPS) are built once per certificate and replaced whole on
rotation: a connection keeps the context it was made with.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.serialization import Encoding

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.identity import load_certificates
from starmesh.bundle.release import format_time
from starmesh.runtime.control_http import Answer, Backoff, Channel, ControlPlaneSettings, WorkloadLimits, snippet
from starmesh.runtime.errors import ControlPlaneError, WorkloadError
from starmesh.runtime.workload_cert import (
    Contexts,
    Credential,
    accept,
    contexts,
    control_plane_context,
    new_request,
    root_trust_domain,
)
from starmesh.runtime.workload_files import load, save
from starmesh.runtime.workload_expiry import ExpiryWatch

__all__ = ["DEFAULT_TRUST_DOMAIN", "WorkloadIdentity", "WorkloadLimits"]

log = logging.getLogger("starmesh.proxy")

DEFAULT_TRUST_DOMAIN = "cluster.local"


class _Issued(msgspec.Struct, frozen=True):
    certificate: str
    ca: str = ""
    expires_at: str = ""


class _Refusal(msgspec.Struct, frozen=True):
    error: str = ""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class WorkloadIdentity:
    """One proxy's workload certificate: `load` it, `start` the renewal loop, ask for contexts.

    `ca_pem` is `--ca-cert` (the mesh roots, the only ones trusted); `bundle_trust_domain`
    gives the applied bundle's `mesh.trust_domain` (None before any)."""

    def __init__(
        self,
        *,
        service: str,
        state_dir: Path,
        ca_pem: bytes,
        join_token: str | None,
        bundle_trust_domain: Callable[[], str | None] = lambda: None,
        limits: WorkloadLimits = WorkloadLimits(),
        now: Callable[[], datetime] = _utc_now,
        rng: random.Random | None = None,
    ) -> None:
        try:
            self.roots = tuple(load_certificates(ca_pem))
        except IdentityError as exc:
            raise WorkloadError(f"--ca-cert: {exc}") from exc
        self.ca_pem = b"".join(root.public_bytes(Encoding.PEM) for root in self.roots)
        self.service = service
        self.state_dir = state_dir
        self.join_token = join_token
        self.limits = limits
        self._bundle_trust_domain = bundle_trust_domain
        self._root_trust_domain = root_trust_domain(self.roots)
        self._now = now
        self._rng = rng or random.Random()
        self._bare = control_plane_context(self.ca_pem.decode("ascii"))
        self.current: Credential | None = None
        self._contexts: Contexts | None = None
        self.rotations = 0
        """Certificates installed so far (loaded or issued); contexts are rebuilt on each."""
        self.last_error: str | None = None
        self._expiry = ExpiryWatch()
        self._ready = asyncio.Event()
        self._channel: Channel | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what the proxy asks for ---------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """The inbound side's context: the current certificate, client certificates required."""
        return self._current_contexts().server

    def client_context(self) -> ssl.SSLContext:
        """The calling side's context: the current certificate, server certificates required."""
        return self._current_contexts().client

    def control_plane_context(self) -> ssl.SSLContext:
        """HTTPS to the control plane: presents the certificate while it is valid (none otherwise)."""
        credential, built = self.current, self._contexts
        if credential is None or built is None or self._now() >= credential.not_after:
            return self._bare
        return built.control_plane

    def _current_contexts(self) -> Contexts:
        built = self._contexts
        if built is None:
            raise WorkloadError(f"no workload certificate yet: {self.waiting_for()}")
        return built

    def trust_domain(self) -> str:
        """The trust domain a certificate request asks for (module docstring: first that applies)."""
        if self.current is not None:
            return self.current.trust_domain
        return self._root_trust_domain or self._bundle_trust_domain() or DEFAULT_TRUST_DOMAIN

    def waiting_for(self) -> str:
        """What the identity waits for (a not-ready reason), with the last error if any."""
        where = "" if self._channel is None else f" at {self._channel.targets.current}"
        why = f"waiting for the workload certificate from the control plane{where}"
        return why if self.last_error is None else f"{why} (last error: {self.last_error})"

    async def wait_ready(self) -> None:
        """Return once there is a certificate."""
        await self._ready.wait()

    def expires_in(self) -> float | None:
        """Seconds until the current certificate's notAfter, negative once past (None: none yet)."""
        current = self.current
        return None if current is None else (current.not_after - self._now()).total_seconds()

    # -- start, run, stop ------------------------------------------------------------------------

    def load(self) -> None:
        """Use the certificate kept in the state dir, if valid (a few small file reads, at start).

        WorkloadError when there is none usable and no join token to ask for one."""
        credential, why = load(self.state_dir, self.roots, service=self.service, now=self._now())
        if credential is not None:
            self._install(credential)
            return
        if self.join_token is None:
            raise WorkloadError(
                f"no usable workload certificate ({why}) and no --join-token: the first certificate "
                "needs the mesh's join token; give --join-token T (the control plane's)"
            )
        log.info("workload certificate: %s; asking the control plane with the join token", why)

    def start(self, settings: ControlPlaneSettings) -> None:
        """Start the renewal loop (which also gets the first certificate) on its own session."""
        self._channel = Channel(settings)
        self._channel.open()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="workload certificate")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            await self._channel.close()

    async def run(self) -> None:
        """Keep a valid certificate: renew at half-life, retry failures with backoff (until cancelled)."""
        limits = self.limits
        backoff = Backoff(limits.backoff_base, limits.backoff_cap, self._rng)
        while True:
            now = self._now()
            self._expiry.note(self.current, now, self.last_error)
            credential = self.current
            if credential is None or now >= credential.renew_at:
                try:
                    await self.renew()
                except WorkloadError as exc:
                    self._failed(str(exc))
                    await asyncio.sleep(backoff.next())
                    continue
                except Exception as exc:  # a bug must not end renewals: log it, back off, go on
                    log.exception("workload certificate renewal failed (a proxy bug)")
                    self._failed(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                await asyncio.sleep(limits.min_renew_seconds)
                continue
            renew_in = (credential.renew_at - now).total_seconds()
            wait = min(renew_in, self._expiry.until_change(credential, now), limits.check_seconds)
            await asyncio.sleep(max(wait, 0.01))

    # -- one renewal -----------------------------------------------------------------------------

    async def renew(self) -> Credential:
        """Ask the control plane for a certificate for a new key; check, keep and use it."""
        channel = self._channel
        if channel is None:
            raise WorkloadError("the workload identity is not started")
        current, now = self.current, self._now()
        headers: dict[str, str] = {}
        if current is None or now >= current.not_after:
            if self.join_token is None:
                gone = "is missing" if current is None else f"expired at {format_time(current.not_after)}"
                raise WorkloadError(f"the workload certificate {gone}, and there is no --join-token to ask with")
            headers["Authorization"] = f"Bearer {self.join_token}"
        trust_domain = self.trust_domain()
        try:
            key, csr = new_request(trust_domain, self.service)
        except IdentityError as exc:
            raise WorkloadError(f"cannot ask for a certificate: {exc}") from exc
        url = channel.targets.current
        try:
            answer = await channel.request(
                "POST", f"{url}/v1/certificates", cap=self.limits.answer_bytes, deadline=self.limits.request_seconds,
                what="certificate request", body={"service": self.service, "csr": csr.decode("ascii")}, headers=headers,
            )  # fmt: skip
        except ControlPlaneError as exc:
            channel.targets.failed(url, str(exc))
            raise WorkloadError(str(exc)) from exc
        if answer.status >= 500:
            channel.targets.failed(url, f"certificate request to {url}: HTTP {answer.status}")
        else:
            channel.targets.succeeded(url)
        if answer.status != 200:
            raise WorkloadError(_refused(answer, self.service, bootstrap=bool(headers)))
        try:
            issued = msgspec.json.decode(answer.body, type=_Issued)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise WorkloadError(f"the answer from {url} is not {{certificate, ca, expires_at}}: {exc}") from exc
        received = self._now()
        try:
            credential = accept(
                key, issued.certificate.encode("utf-8"), self.roots, service=self.service,
                trust_domain=trust_domain, now=received, issued_at=received,
            )  # fmt: skip
        except WorkloadError as exc:
            raise WorkloadError(f"the certificate from {url} was refused (kept the current one): {exc}") from None
        self._install(credential)
        try:
            await asyncio.to_thread(save, self.state_dir, credential)
        except OSError as exc:
            log.error("cannot keep the workload certificate in %s (%s): it is used, but a restart will need "
                      "the control plane", self.state_dir, exc.strerror or exc)  # fmt: skip
        self.last_error = None
        return credential

    def _install(self, credential: Credential) -> None:
        """Build the contexts for `credential` and swap them in whole."""
        built = contexts(credential, self.ca_pem.decode("ascii"), self.state_dir)
        self.current, self._contexts = credential, built
        self.rotations += 1
        self._ready.set()
        log.info("workload certificate %s, valid until %s (renewal from %s)",
                 credential.spiffe_id, format_time(credential.not_after), format_time(credential.renew_at))  # fmt: skip

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("workload certificate: %s; retrying with backoff", reason)
        self.last_error = reason


def _refused(answer: Answer, service: str, *, bootstrap: bool) -> str:
    """What a refusal of a certificate request means, and what to do."""
    try:
        error = msgspec.json.decode(answer.body, type=_Refusal).error or snippet(answer.body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        error = snippet(answer.body)
    where = f"the control plane at {answer.url.split('/v1/', 1)[0]}"
    status = f"HTTP {answer.status}: {error}"
    if answer.status == 401 and bootstrap:
        return f"{where} refused the join token ({status}); give the control plane's --join-token"
    if answer.status == 401:
        return f"{where} refused the renewal with the current certificate ({status})"
    if answer.status == 403:
        return f"{where} refused a certificate for service {service!r} ({status})"
    if answer.status in (404, 405):
        return f"{where} issues no certificates ({status}); start it with --ca DIR --join-token T"
    return f"{where} answered the certificate request with {status}"
