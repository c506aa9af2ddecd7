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
in step. With neither, the proxy runs not ready and keeps trying.

What it prints on stdout, one line each, flushed (tests and `starmesh up` read it):

    starmesh proxy: links are plaintext (...)
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from aiohttp import web

from starmesh.bundle.keys import PublicKey
from starmesh.runtime.admin import AdminInfo, start_admin
from starmesh.runtime.apply import Applier, ApplyResult
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.control import ControlLimits, ControlPlaneClient, ControlPlaneSettings
from starmesh.runtime.endpoints import Endpoints, EndpointTable, parse_address, parse_endpoints
from starmesh.runtime.errors import ConfigRejected, IdentityError, ListenerError
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.http.server import start_listener
from starmesh.runtime.identity import load_or_create_proxy_id
from starmesh.runtime.lkg import load_state
from starmesh.runtime.message import Handler, Request, Response, proxy_response
from starmesh.runtime.restore import restore_last_known_good
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

__all__ = ["CONTROL_PLANE_PLAINTEXT_NOTICE", "PLAINTEXT_NOTICE", "Proxy", "ProxyConfig", "run_proxy"]

PLAINTEXT_NOTICE = "starmesh proxy: links are plaintext (local development: --bundle without certificates)"
CONTROL_PLANE_PLAINTEXT_NOTICE = (
    "starmesh proxy: links are plaintext (the control-plane form without mesh certificates)"
)

log = logging.getLogger("starmesh.proxy")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """What `starmesh proxy` was asked to do (addresses are `HOST:PORT`, checked by the CLI).

    Exactly one form: `bundle` (local development), or `control_plane` URLs with the
    `trusted` release signing keys (`control_limits`: caps and timings, tests shrink them)."""

    service: str
    version: str
    app: str
    inbound: str
    outbound: str
    admin: str
    state_dir: Path
    bundle: Path | None = None
    endpoints: Path | None = None
    control_plane: tuple[str, ...] = ()
    trusted: tuple[PublicKey, ...] = ()
    control_limits: ControlLimits = ControlLimits()
    grace_seconds: float = 10.0
    limits: HttpLimits = HttpLimits()


def _not_ready_answer(why: Callable[[], str]) -> Callable[[], Awaitable[Response]]:
    async def answer() -> Response:
        return proxy_response(503, "not-ready", why())

    return answer


class Proxy:
    """One proxy process's parts, started by `start` and stopped by `stop`."""

    def __init__(self, config: ProxyConfig, *, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.limits = config.limits
        self.pool = UpstreamPool(self.limits)
        self.recorder = MemoryRecorder()
        self.endpoints = Endpoints()
        self.deps = ChainDeps(
            pool=self.pool,
            endpoints=self.endpoints,
            state=StateRegistry(),
            recorder=self.recorder,
            local_service=config.service,
            local_version=config.version,
            rng=random.Random(),
            clock=time.monotonic,
        )
        self.applier = Applier(self.deps, app=config.app, state_dir=config.state_dir)
        self.listeners: dict[str, str] = {"app": config.app}
        self._servers: list[asyncio.Server] = []
        self._admin: web.AppRunner | None = None
        self._not_ready: str | None = None
        self.client: ControlPlaneClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()

    # -- traffic -----------------------------------------------------------------

    def not_ready_reason(self) -> str:
        """Why there is no config (what /readyz and 503 `not-ready` say)."""
        reason = self._not_ready or "no config applied yet"
        if self.client is not None:
            return f"{reason}; {self.client.waiting_for()}"
        return reason

    def dispatchers(self) -> tuple[Handler, Handler]:
        """The outbound and inbound dispatch: take the current table once, hand it the request."""
        applier = self.applier
        not_ready = _not_ready_answer(self.not_ready_reason)

        def outbound(request: Request) -> Awaitable[Response]:
            table = applier.current
            if table is None:
                return not_ready()
            return table.outbound(request)

        def inbound(request: Request) -> Awaitable[Response]:
            table = applier.current
            if table is None:
                return not_ready()
            return table.inbound(request)

        return outbound, inbound

    # -- config ------------------------------------------------------------------

    def _read_files(self) -> tuple[bytes, EndpointTable | None]:
        """The --bundle bytes and the parsed --endpoints table; ConfigRejected saying which file."""
        assert self.config.bundle is not None
        try:
            data = self.config.bundle.read_bytes()
        except OSError as exc:
            raise ConfigRejected(f"cannot read bundle file {self.config.bundle}: {exc.strerror or exc}") from exc
        if self.config.endpoints is None:
            return data, None
        try:
            raw = self.config.endpoints.read_bytes()
        except OSError as exc:
            raise ConfigRejected(
                f"cannot read endpoints file {self.config.endpoints}: {exc.strerror or exc}"
            ) from exc
        return data, parse_endpoints(raw, str(self.config.endpoints))

    async def apply_files(self) -> ApplyResult:
        """Read and apply --bundle (and --endpoints); a bad file changes nothing."""
        try:
            data, endpoints = self._read_files()
        except ConfigRejected as exc:
            return self.applier.reject("file", str(exc))
        return await self.applier.apply(
            data,
            expected_digest=None,
            release_version=None,
            origin="file",
            endpoints=endpoints if endpoints is not None else {},
            endpoints_source=str(self.config.endpoints or "endpoints"),
        )

    async def start_config(self) -> None:
        """The start-up apply. `--bundle`: the file, and when it is refused last-known-good;
        control-plane form: last-known-good whose release verifies. Else not ready."""
        state_dir = self.config.state_dir
        state = await asyncio.to_thread(load_state, state_dir)
        self.applier.high_water = state.high_water
        if self.config.bundle is None:
            why = await restore_last_known_good(self.applier, state, state_dir=state_dir, trusted=self.config.trusted)
            if why is not None:
                self._not_ready = f"no config yet: {why}"
            return
        result = await self.apply_files()
        if result.ok:
            return
        file_error = f"bundle file {self.config.bundle} not applied: {result.error}"
        why = await restore_last_known_good(self.applier, state, state_dir=state_dir, trusted=None)
        if why is None:
            log.warning("started from last-known-good (%s)", file_error)
        else:
            self._not_ready = f"{file_error}; {why}"

    async def reload(self) -> ApplyResult | None:
        """SIGHUP: re-read the files and apply them; on failure the old table stays.

        In the control-plane form there is nothing to re-read (None)."""
        if self.config.bundle is None:
            log.info("SIGHUP: nothing to re-read in the control-plane form; the control plane drives the config")
            return None
        result = await self.apply_files()
        if result.ok:
            self._not_ready = None
            log.info("SIGHUP: %s %s", "applied" if result.changed else "unchanged", result.digest)
        else:
            log.error("SIGHUP: the files were not applied (the reason is above); the current config stays")
        return result

    # -- process -----------------------------------------------------------------

    async def start(self) -> None:
        """Apply the config, bind every listener, print the addresses, connect to the control plane.

        ListenerError on a bind failure; IdentityError when the proxy id cannot be kept."""
        settings = self._control_plane_settings()
        await self.start_config()
        outbound, inbound = self.dispatchers()
        sides: tuple[tuple[Literal["outbound", "inbound"], str, Handler], ...] = (
            ("outbound", self.config.outbound, outbound),
            ("inbound", self.config.inbound, inbound),
        )
        for side, address, dispatch in sides:
            host, port = _split(address)
            try:
                server = await start_listener(host, port, dispatch, side=side, limits=self.limits)
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
            self.client = ControlPlaneClient(
                settings, self.applier, address=lambda: self.listeners["inbound"], on_applied=self._applied
            )
        self._say(PLAINTEXT_NOTICE if settings is None else CONTROL_PLANE_PLAINTEXT_NOTICE)
        for name in ("outbound", "inbound", "admin"):
            self._say(f"{name} {self.listeners[name]}")
        applied = self.applier.applied
        if applied is not None:
            self._say(f"ready {applied.digest}")
        else:
            self._say(f"not ready: {self.not_ready_reason()}")
        if self.client is not None:
            await self.client.start()

    def _control_plane_settings(self) -> ControlPlaneSettings | None:
        config = self.config
        if config.bundle is not None:
            return None
        proxy_id = load_or_create_proxy_id(config.state_dir, config.service, config.version)
        return ControlPlaneSettings(
            urls=config.control_plane,
            trusted=config.trusted,
            proxy_id=proxy_id,
            service=config.service,
            version=config.version,
            limits=config.control_limits,
        )

    def _applied(self, result: ApplyResult) -> None:
        self._say(f"applied release {result.version} {result.digest}")

    def _metrics(self) -> str:
        text = self.recorder.render()
        return text if self.client is None else text + self.client.metrics()

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
        if self.client is not None:
            await self.client.close()  # no apply starts while the proxy winds down
        for server in self._servers:
            server.close()
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

    def _in_flight(self) -> int:
        endpoints = self.endpoints.addresses() | {self.config.app}
        return sum(self.pool.active(endpoint) for endpoint in endpoints)

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop; the exit code."""
        self.install_signals()
        try:
            await self.start()
        except (ListenerError, IdentityError) as exc:
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


def _bound(server: asyncio.Server) -> str:
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
        return await Proxy(config, out=out).run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
