"""The proxy process: listeners, the applied config, signals, shutdown.

    run_proxy(config)     uvloop; apply the config; outbound, inbound and admin listeners;
                          print the bound addresses; SIGHUP re-reads --bundle/--endpoints;
                          SIGTERM/SIGINT stop accepting, let in-flight requests finish
                          (bounded), close the pools and return 0.

Start in the `--bundle FILE [--endpoints FILE]` form: the file is applied (origin
`file`); when it is invalid the proxy starts from last-known-good in `--state-dir`
(origin `last-known-good`) if there is one, else it runs not ready and says why:
traffic gets 503 `not-ready`, `/readyz` 503 with the reason.

Start in the control-plane form (`--control-plane URL... --trust FILE...`): the newest
last-known-good generation whose signed release verifies against the trusted keys
(signature and digest; not expiry) is applied (origin `last-known-good`), falling back
to the previous generation; then the `ControlPlaneClient` connects and keeps the config
in step. With neither, the proxy runs not ready and keeps trying. (startup.py holds
`ProxyConfig` and does the start-up apply; this module wires the parts and runs them.)

With `--ca-cert FILE [--join-token T]` the proxy has a workload identity (workload.py):
its certificate on disk is loaded first (none usable and no join token: exit 2), the
control-plane link (control_link.py) gets or renews it, and both listeners do mTLS per
the mesh's mode with its contexts (tls.py, chain.py).

What it prints on stdout, one line each, flushed (tests and `starmesh up` read it):

    starmesh proxy: links are plaintext (...)     or    starmesh proxy: mesh identity ... (--ca-cert)
    outbound 127.0.0.1:15001
    inbound 127.0.0.1:15006
    admin 127.0.0.1:15000
    ready sha256:<hex>          or    not ready: <why>
    applied release 7 sha256:<hex>     (control-plane form: after every apply from the control plane)

Logs go to stderr, one line per event (applies, rejections, signals); nothing is
logged per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Literal, TextIO

from aiohttp import web

from starmesh.runtime.access_log import open_access_log
from starmesh.runtime.admin import AdminInfo, start_admin
from starmesh.runtime.apply import Applier, ApplyResult
from starmesh.runtime.chain import ChainDeps, OutboundMTLS, build_answering
from starmesh.runtime.endpoints import Endpoints, parse_address
from starmesh.runtime.errors import IdentityError, ListenerError, WorkloadError
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.server import start_listener
from starmesh.runtime.message import Handler, Request, Response, proxy_response
from starmesh.runtime.startup import ProxyConfig, apply_files, control_plane_settings, reload_files, start_config
from starmesh.runtime.startup import workload_identity
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.otel_gauges import StateSources, register_state_gauges
from starmesh.runtime.otel_metrics import ProxyMetrics
from starmesh.runtime.table import UNKNOWN_SERVICE
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.tls import InboundPolicy, InboundTLS, MeshListener, MeshTLS
from starmesh.runtime.tracing import Tracer

if TYPE_CHECKING:  # the control-plane form's parts, imported when it starts them (release signatures,
    # certificates: cryptography, which the --bundle form never loads)
    from starmesh.runtime.control import ControlPlaneClient
    from starmesh.runtime.control_link import ControlLink

__all__ = [
    "CONTROL_PLANE_PLAINTEXT_NOTICE",
    "MESH_IDENTITY_NOTICE",
    "PLAINTEXT_NOTICE",
    "Proxy",
    "ProxyConfig",  # startup.py's, re-exported: what `starmesh proxy` hands run_proxy
    "run_proxy",
]

PLAINTEXT_NOTICE = "starmesh proxy: links are plaintext (local development: --bundle without certificates)"
CONTROL_PLANE_PLAINTEXT_NOTICE = (
    "starmesh proxy: links are plaintext (the control-plane form without mesh certificates)"
)
MESH_IDENTITY_NOTICE = "starmesh proxy: mesh identity {identity} (a workload certificate from the mesh CA, --ca-cert)"

log = logging.getLogger("starmesh.proxy")


class Proxy:
    """One proxy process's parts, started by `start` and stopped by `stop`."""

    def __init__(self, config: ProxyConfig, *, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.limits = config.limits
        self.pool = UpstreamPool(self.limits)
        self.recorder = MemoryRecorder()
        # Metrics: the recorder's counts and (below) the proxy's state through OpenTelemetry,
        # for /metrics and, with --otlp-endpoint, pushed over OTLP (otel_metrics.py).
        self.metrics = ProxyMetrics(
            self.recorder,
            resource={"service.name": config.service, "service.version": config.version},
            otlp_endpoint=config.otlp_endpoint,
        )
        self.endpoints = Endpoints()
        # With --ca-cert: the workload identity, and mTLS on both sides from its contexts.
        self.workload = workload_identity(config, self._bundle_trust_domain)
        mesh = None if self.workload is None else MeshTLS(self.workload, self.workload.roots)
        # Traces (spans exported with --otlp-endpoint) and access logs (--access-log), every request.
        self.tracer = Tracer(config.service, config.version, endpoint=config.otlp_endpoint)
        self.access_log = open_access_log(config.access_log, config.state_dir)
        self.deps = ChainDeps(
            pool=self.pool,
            endpoints=self.endpoints,
            state=StateRegistry(),
            recorder=self.recorder,
            local_service=config.service,
            local_version=config.version,
            rng=random.Random(),
            clock=time.monotonic,
            mtls=None if mesh is None else OutboundMTLS(self.pool, mesh, self.endpoints),
            tracer=self.tracer,
            access_log=self.access_log,
        )
        self.applier = Applier(self.deps, app=config.app, state_dir=config.state_dir)
        self.inbound_tls = (
            None if mesh is None
            else InboundTLS(mesh, self._inbound_policy, handshake_timeout=self.limits.header_timeout)
        )  # fmt: skip  (a silent or slow handshake gets as long as a slow request head)
        # The proxy's state as metrics, read when they are collected (otel_gauges.py).
        register_state_gauges(
            self.metrics.meter,
            StateSources(
                self.applier,
                self.inbound_tls,
                lambda: self.link,
                access_log=self.access_log,
                spans_dropped=(lambda: self.tracer.dropped) if self.tracer.exporting else None,
            ),
        )
        self.listeners: dict[str, str] = {"app": config.app}
        self._servers: list[asyncio.Server | MeshListener] = []
        self._admin: web.AppRunner | None = None
        self._not_ready: str | None = None
        self.client: ControlPlaneClient | None = None
        self.link: ControlLink | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()

    # -- traffic -----------------------------------------------------------------

    def not_ready_reason(self) -> str:
        """Why there is no config (what /readyz and 503 `not-ready` say)."""
        reason = self._not_ready or "no config applied yet"
        return reason if self.link is None else f"{reason}; {self.link.waiting_for()}"

    def dispatchers(self) -> tuple[Handler, Handler]:
        """The outbound and inbound dispatch: take the current table once, hand it the request.

        Before any config, 503 `not-ready`, counted and logged like any request (under the
        mesh defaults): outbound to "unknown" (no service is declared yet), inbound to the
        local service."""
        applier = self.applier

        def not_ready(request: Request) -> Response:
            return proxy_response(503, "not-ready", self.not_ready_reason())

        unready_outbound = build_answering(self.deps, "outbound", UNKNOWN_SERVICE, not_ready)
        unready_inbound = build_answering(self.deps, "inbound", self.config.service, not_ready)

        def outbound(request: Request) -> Awaitable[Response]:
            table = applier.current
            if table is None:
                return unready_outbound(request)
            return table.outbound(request)

        def inbound(request: Request) -> Awaitable[Response]:
            table = applier.current
            if table is None:
                return unready_inbound(request)
            return table.inbound(request)

        return outbound, inbound

    # -- config ------------------------------------------------------------------

    async def apply_files(self) -> ApplyResult:
        """Read and apply --bundle (and --endpoints); a bad file changes nothing."""
        return await apply_files(self.applier, self.config)

    async def start_config(self) -> None:
        """The start-up apply (startup.start_config); when none is live, why is the not-ready reason."""
        self._not_ready = await start_config(self.applier, self.config)

    async def reload(self) -> ApplyResult | None:
        """SIGHUP: re-read the files and apply them (startup.reload_files); on failure the old table stays."""
        result = await reload_files(self.applier, self.config)
        if result is not None and result.ok:
            self._not_ready = None
        return result

    # -- process -----------------------------------------------------------------

    def _bundle_trust_domain(self) -> str | None:
        return None if self.applier.current is None else self.applier.current.bundle.spec.mesh.trust_domain

    def _inbound_policy(self) -> InboundPolicy | None:
        return None if self.applier.current is None else self.applier.current.inbound_policy

    async def start(self) -> None:
        """Load the workload certificate, apply the config, bind every listener, print the
        addresses, connect to the control plane.

        ListenerError on a bind failure; IdentityError when the proxy id cannot be kept;
        WorkloadError when there is no workload certificate and no join token to ask with."""
        if self.workload is not None:
            self.workload.load()
        tls = None if self.workload is None else self.workload.control_plane_context
        settings = control_plane_settings(self.config, tls=tls)
        await self.start_config()
        outbound, inbound = self.dispatchers()
        sides: tuple[tuple[Literal["outbound", "inbound"], str, Handler], ...] = (
            ("outbound", self.config.outbound, outbound),
            ("inbound", self.config.inbound, inbound),
        )
        for side, address, dispatch in sides:
            host, port = _split(address)
            try:
                server: asyncio.Server | MeshListener
                counts = self.recorder.connections  # starmesh_active_connections{listener}
                if side == "inbound" and self.inbound_tls is not None:  # TLS or not per the mode, per connection
                    server = await start_listener(host, port, dispatch, side=side, limits=self.limits,
                                                  tls=self.inbound_tls, connections=counts)  # fmt: skip
                else:
                    server = await start_listener(host, port, dispatch, side=side, limits=self.limits,
                                                  connections=counts)  # fmt: skip
            except OSError as exc:
                raise ListenerError(f"--{side} {address}: cannot listen: {exc.strerror or exc}") from exc
            self._servers.append(server)
            self.listeners[side] = _bound(server)
        host, port = _split(self.config.admin)
        info = AdminInfo(
            service=self.config.service,
            version=self.config.version,
            listeners=self.listeners,
            metrics=self._metrics,
            not_ready=lambda: None if self.applier.current is not None else self.not_ready_reason(),
            control_plane=lambda: None if self.client is None else self.client.to_json(),
        )
        try:
            self._admin, self.listeners["admin"] = await start_admin(self.applier, info, host, port)
        except OSError as exc:
            raise ListenerError(f"--admin {self.config.admin}: cannot listen: {exc.strerror or exc}") from exc
        if settings is not None:
            from starmesh.runtime.control import ControlPlaneClient
            from starmesh.runtime.control_link import ControlLink

            self.client = ControlPlaneClient(
                settings, self.applier, address=lambda: self.listeners["inbound"], on_applied=self._applied,
                requests_total=self.recorder.requests_total,
            )
            self.link = ControlLink(settings, self.client, self.workload)
        self._say(self._notice(settings is not None))
        for name in ("outbound", "inbound", "admin"):
            self._say(f"{name} {self.listeners[name]}")
        applied = self.applier.applied
        if applied is not None:
            self._say(f"ready {applied.digest}")
        else:
            self._say(f"not ready: {self.not_ready_reason()}")
        if self.link is not None:
            await self.link.start()  # with --ca-cert: the first certificate, then releases

    def _notice(self, control_plane: bool) -> str:
        if self.workload is not None:
            current = self.workload.current
            return MESH_IDENTITY_NOTICE.format(identity=current.spiffe_id if current is not None else "pending")
        return CONTROL_PLANE_PLAINTEXT_NOTICE if control_plane else PLAINTEXT_NOTICE

    def _applied(self, result: ApplyResult) -> None:
        self._say(f"applied release {result.version} {result.digest}")

    def _metrics(self) -> bytes:
        return self.metrics.render()

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def install_signals(self) -> None:
        """SIGHUP reloads; SIGTERM and SIGINT stop."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)

    def _spawn_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for the grace period, close the pools."""
        if self.link is not None:
            await self.link.close()  # no apply starts while the proxy winds down
        for server in self._servers:
            server.close()
        # A mesh listener drops the connections still in their handshake; wait for that
        # (asyncio.Server's open connections finish below, within the grace period).
        await asyncio.gather(*(s.wait_closed() for s in self._servers if isinstance(s, MeshListener)))
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.grace_seconds
        # In-flight requests are the ones waiting on an upstream (the local app or an
        # endpoint); poll until none is left or the grace period is over.
        while self._in_flight() and loop.time() < end:
            await asyncio.sleep(0.01)
        if self._in_flight():
            log.warning("grace period of %ss over; closing the remaining connections", self.config.grace_seconds)
        if self._admin is not None:
            await self._admin.cleanup()
        for task in list(self._tasks):
            task.cancel()
        await self.pool.close()
        # Write the queued access-log lines and export the queued spans (both bounded in time).
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)
        await asyncio.to_thread(self.tracer.shutdown)
        await asyncio.to_thread(self.metrics.shutdown)  # with OTLP: a last push (bounded)

    def _in_flight(self) -> int:
        endpoints = self.endpoints.addresses() | {self.config.app}
        return sum(self.pool.active(endpoint) for endpoint in endpoints)

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop; the exit code."""
        self.install_signals()
        try:
            await self.start()
        except (ListenerError, IdentityError, WorkloadError) as exc:
            log.error("%s", exc)
            print(f"starmesh: error: {exc}", file=sys.stderr, flush=True)
            await self.stop()
            return 2
        await self.stopping.wait()
        log.info("stopping: no new connections; in-flight requests get %ss", self.config.grace_seconds)
        await self.stop()
        return 0


def _split(address: str) -> tuple[str, int]:
    try:
        return parse_address(address, allow_port_zero=True)
    except ValueError as exc:
        raise ListenerError(str(exc)) from None


def _bound(server: asyncio.Server | MeshListener) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_proxy(config: ProxyConfig, *, out: TextIO = sys.stdout) -> int:
    """Run the proxy process on uvloop until a stop signal; returns the exit code."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s starmesh proxy %(levelname)s %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop

    async def main() -> int:
        try:
            proxy = Proxy(config, out=out)
        except WorkloadError as exc:
            print(f"starmesh: error: {exc}", file=sys.stderr, flush=True)
            return 2
        return await proxy.run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
