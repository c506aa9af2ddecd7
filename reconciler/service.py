"""The control-plane process: its parts wired together, its output, its signals.

    --state-dir DIR
      store/            FileStore ─► Ledger (bundles, releases, versions, status, rollout)
      mirror.git        RepoSource's mirror of a --repo URL
    Issuer(--key)       signs releases (TTL --release-ttl; re-issued at half life)
    Registry(--proxy-ttl)  proxies' heartbeats ─► endpoints, stale proxies
    Rollout             which release each proxy gets
    Reconciler ◄─poke── RepoWatcher (watchdog / fetch poll)
    ControlPlaneMetrics ◄── compiles, releases, NACKs; its gauges read registry, rollout, ledger
    api.make_app ─────► AppRunner/TCPSite on --listen (and /metrics)
    --ca DIR            load_ca ─► MeshIdentity (join token, --cert-lifetime) for the API,
                        ServerTLS: HTTPS with a mesh-CA server certificate, renewed at half life
    --store etcd://...  ha.Replication: the store is etcd (a mirror kept by a watch), not
                        store/; the reconcile loop and the repo watcher run only while this
                        replica leads (election); followers serve the API from the mirror

What it prints on stdout, one line each, flushed (tests and `starmesh up` read it):

    listening 127.0.0.1:8080                   the bound address (port 0 picks one)
    ready release 3 sha256:<hex>               after the first reconcile pass, or
    not ready: <why>                           then `ready ...` once a release exists
    role leader                                with --store: whenever the role changes
    role follower (leader r1)

Without `--ca` the API is plain HTTP; with it, HTTPS (certificates.py), and a log line
says so. It is ready (`/readyz` 200) once it can serve a release, compiled now or loaded
from the store. Logs go to stderr. SIGTERM or SIGINT stop the watcher, the loop, the long-polls
(cut after `shutdown_timeout`) and the listener, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
import urllib.parse
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from starmesh.bundle.errors import BundleError
from starmesh.bundle.keys import PrivateKey, keyid_of, load_private_key
from starmesh.bundle.release import DEFAULT_TTL
from starmesh.reconciler.api import ApiDeps, make_app
from starmesh.reconciler.ca import load_ca
from starmesh.reconciler.certificates import (
    DEFAULT_CERT_LIFETIME,
    MeshIdentity,
    ServerTLS,
    check_join_token,
    server_hosts,
)
from starmesh.reconciler.errors import ReconcilerError, StoreError
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import ControlPlaneMetrics
from starmesh.reconciler.reconcile import Reconciler, ReconcileResult
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout
from starmesh.reconciler.source import RepoSource
from starmesh.reconciler.store import FileStore, Store
from starmesh.reconciler.watch import RepoWatcher

if TYPE_CHECKING:  # ha.py carries the etcd client: loaded only with --store
    from starmesh.reconciler.ha import Replication

__all__ = ["ControlPlane", "ControlPlaneConfig", "run_control_plane"]

log = logging.getLogger("starmesh.control_plane")


@dataclass(frozen=True)
class ControlPlaneConfig:
    """What `starmesh control-plane` was asked to do (checked by the CLI)."""

    repo: str
    key: Path
    state_dir: Path
    listen: str
    branch: str = "main"
    subdir: str = ""
    entry: str = "mesh.star"
    poll_interval: float | None = None  # None: 10 s for a local repo, 15 s for a URL
    proxy_ttl: float = 30.0
    release_ttl: timedelta = DEFAULT_TTL
    ca: Path | None = None  # the mesh CA directory: HTTPS and certificates (with join_token)
    join_token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs
    cert_lifetime: timedelta = DEFAULT_CERT_LIFETIME
    tick_interval: float = 1.0
    shutdown_timeout: float = 1.0  # seconds in-flight requests (long-polls) get at stop
    store: str | None = None  # etcd://HOST:PORT,...: high availability (state in etcd, not state_dir/store)
    replica_id: str = "control-plane"  # with store: this replica's name among the others
    advertise_url: str | None = None  # with store: where the other replicas reach this one (default: --listen)
    leader_ttl: float = 10.0  # with store: the leader lease, seconds (failover time vs false failovers)
    store_ca: str | None = None  # with store: PEM CA of etcd's server certificates (HTTPS to etcd)
    store_cert: str | None = None  # with store: PEM client certificate for etcd (with store_key)
    store_key: str | None = None  # with store: its PEM private key


class ControlPlane:
    """One control-plane process's parts, started by `start` and stopped by `stop`."""

    def __init__(self, config: ControlPlaneConfig, *, out: TextIO = sys.stdout, key: PrivateKey | None = None) -> None:
        self.config = config
        self.out = out
        self.identity = _mesh_identity(config)  # first: a bad --ca or token touches no state
        self.replication: Replication | None = None
        store: Store
        if config.store is None:
            store = FileStore(config.state_dir / "store")
        else:
            from starmesh.reconciler.ha import ReplicaSettings, Replication

            self.replication = Replication(ReplicaSettings(
                config.store, config.replica_id, config.leader_ttl, config.store_ca, config.store_cert, config.store_key
            ))  # fmt: skip
            self.replication.open()  # the mirror: every read below comes from it
            store = self.replication.store.fenced(self.replication.fence)
        self.ledger = Ledger(store)
        self.metrics = ControlPlaneMetrics()  # served at /metrics; the parts report their events to it
        signer = key if key is not None else load_private_key(config.key)
        self.issuer = Issuer(self.ledger, signer, ttl=config.release_ttl, metrics=self.metrics)
        # The endpoint warm-up protects proxies from a restarted control plane's half-filled
        # table; a first start (nothing released yet) has no earlier proxies to protect.
        fresh = self.ledger.current() is None
        self.registry = Registry(ttl=config.proxy_ttl, warmup=0.0 if fresh else None, metrics=self.metrics)
        self.rollout = Rollout(self.ledger, self.issuer, self.registry, writable=self.replication is None)
        self.source = RepoSource(config.repo, config.branch, config.state_dir)
        self.reconciler = Reconciler(
            self.source,
            self.ledger,
            self.issuer,
            self.rollout,
            registry=self.registry,
            subdir=config.subdir,
            entry=config.entry,
            on_result=self._after_pass,
            tick_interval=config.tick_interval,
            metrics=self.metrics,
        )
        self.watcher = RepoWatcher(self.source, self.reconciler.poke, poll_interval=config.poll_interval)
        self.tls: ServerTLS | None = None
        self.stopping = asyncio.Event()
        self.address: str | None = None
        self._runner: web.AppRunner | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._said_status = False
        self._said_ready = False
        self._loop_stop = asyncio.Event()
        self._role_task: asyncio.Task[None] | None = None

    # -- readiness -------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """None once a release can be served, else why not (`/readyz` 503, `not ready:`)."""
        try:
            if self.ledger.current() is not None:
                return None
        except StoreError as exc:
            return f"the state store cannot be read: {exc}"
        last = self.reconciler.last_result
        if last is None:
            return f"no release yet ({self.reconciler.phase})"
        if last.outcome == "rejected" and last.commit is not None:
            return (
                f"no release yet: commit {last.commit[:12]} was rejected ({last.detail}); "
                "see last_compile in /v1/status, fix the policy and commit"
            )
        return f"no release yet: {last.detail}"

    def _after_pass(self, result: ReconcileResult | None) -> None:
        """Say `ready ...` or `not ready: ...` after the first pass, and `ready` once a release exists."""
        if self._said_ready:
            return
        current = self.ledger.current()
        if current is not None:
            self._say(f"ready release {current.version} {current.bundle}")
            self._said_ready = self._said_status = True
        elif not self._said_status:
            self._say(f"not ready: {self.not_ready_reason()}")
            self._said_status = True

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- process ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the API, print the address, start the loop and the watcher."""
        deps = ApiDeps(
            ledger=self.ledger,
            registry=self.registry,
            rollout=self.rollout,
            last_compile=self.ledger.last_compile,
            ready=self.not_ready_reason,
            extra_status=self._extra_status,
            metrics=self.metrics,
            on_proxy_change=self.replication.published if self.replication is not None else _nothing,
            forward=self.replication.forward if self.replication is not None else None,
        )
        app = make_app(deps, identity=self.identity)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.config.shutdown_timeout)
        await runner.setup()
        self._runner = runner
        host, port = _split(self.config.listen)
        if self.identity is not None:
            self.tls = ServerTLS(self.identity.ca, server_hosts(host, _advertised_host(self.config.advertise_url)))
        try:
            await web.TCPSite(runner, host, port, ssl_context=None if self.tls is None else self.tls.context).start()
        except OSError as exc:
            raise ReconcilerError(f"--listen {self.config.listen}: cannot listen: {exc.strerror or exc}") from exc
        bound_host, bound_port = runner.addresses[0][:2]
        self.address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        self._say(f"listening {self.address}")
        if self.tls is not None and self.identity is not None:
            log.info(
                "serving https://%s with a certificate from the mesh CA (trust domain %s) for %s; proxy routes need "
                "a client certificate, proxies join with the join token; their certificates last %ds",
                self.address, self.identity.ca.trust_domain, ", ".join(self.tls.hosts),
                self.identity.cert_lifetime.total_seconds(),
            )  # fmt: skip
            self._renew_task = asyncio.get_running_loop().create_task(
                self.tls.renew_forever(), name="starmesh-server-certificate"
            )
        else:
            log.info("serving plain http://%s (no --ca: no TLS, no mesh certificates)", self.address)
        if self.replication is None:
            log.info("following %s branch %s; state in %s", self.config.repo, self.config.branch, self.config.state_dir)
            await self._lead()
            return
        log.info("replica %s of the control plane on %s; following %s branch %s once it leads",
                 self.config.replica_id, self.config.store, self.config.repo, self.config.branch)  # fmt: skip
        self.replication.start(
            self.config.advertise_url or self._default_url(),
            self.registry,
            self.rollout,
            on_change=self._role_changed,
            on_release=lambda: self._after_pass(None),
            client_ssl=self._client_ssl(),
            signing_key=keyid_of(self.issuer.key),
            repo=self.config.repo,
            branch=self.config.branch,
            metrics=self.metrics,
        )
        self._after_pass(None)  # a release in the store: ready at once

    async def _lead(self) -> None:
        """Run the reconcile loop and the repo watcher (always without --store; while leading with it)."""
        self._loop_stop = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(
            self.reconciler.run(self._loop_stop), name="starmesh-reconcile"
        )
        await self.watcher.start()

    async def _follow(self) -> None:
        """Stop the loop and the watcher: another replica leads (or none, for now)."""
        self._loop_stop.set()
        await self.watcher.stop()
        task, self._loop_task = self._loop_task, None
        if task is not None:
            # The loop sees its stop at once unless a compile is running in its thread.
            done, _ = await asyncio.wait([task], timeout=self.config.shutdown_timeout)
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _role_changed(self, leading: bool) -> None:
        """The election moved (on the loop): lead or follow, one change after the other."""
        previous = self._role_task

        async def change() -> None:
            if previous is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await previous
            if self.stopping.is_set():
                return
            if leading:
                self.rollout.set_writable(True)  # reloads: the rollout continues where the store has it
                await self._lead()
                self._say("role leader")
            else:
                await self._follow()
                self.rollout.set_writable(False)
                election = self.replication.election if self.replication is not None else None
                info = election.leader() if election is not None else None
                self._say(f"role follower (leader {info.id if info is not None else 'none yet'})")

        self._role_task = asyncio.get_running_loop().create_task(change(), name="starmesh-role")

    def _extra_status(self) -> dict[str, object]:
        extra: dict[str, object] = {"reconciler": self.reconciler.to_json()}
        if self.replication is not None:
            extra["control_plane"] = self.replication.to_json()
        return extra

    def _default_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.address}"

    def _client_ssl(self) -> ssl.SSLContext | None:
        """How a follower trusts the leader it forwards to: the mesh root (with --ca)."""
        if self.identity is None:
            return None
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=self.identity.ca.certificate.public_bytes(Encoding.PEM).decode("ascii"))
        return context

    async def stop(self) -> None:
        """Stop the watcher, the loop and the listener; safe after a failed start."""
        self.stopping.set()
        self._loop_stop.set()
        role, self._role_task = self._role_task, None
        if role is not None:
            role.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await role
        self.source.close()
        await self._follow()  # the loop and the watcher first: a leader resigns after its last write
        if self.replication is not None:
            await self.replication.stop()
        renewing, self._renew_task = self._renew_task, None
        if renewing is not None:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.metrics.close()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop; the exit code."""
        self.install_signals()
        try:
            await self.start()
        except ReconcilerError as exc:
            print(f"starmesh: error: {exc}", file=sys.stderr, flush=True)
            await self.stop()
            return 2
        await self.stopping.wait()
        log.info("stopping")
        await self.stop()
        log.info("stopped")
        return 0


def _raise_open_files_limit() -> None:
    """Every proxy holds two long-polls open: lift the soft limit on open files to the hard one
    (a soft limit of 1,024 would cap a replica near 500 proxies)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit above %d: %s", soft, exc)
    log.debug("open files limit: %s", resource.getrlimit(resource.RLIMIT_NOFILE))


def _advertised_host(url: str | None) -> str | None:
    """The host in `--advertise-url` (the server certificate covers it: followers forward there)."""
    return None if url is None else urllib.parse.urlsplit(url).hostname


def _nothing(_: str) -> None:
    return None


def _mesh_identity(config: ControlPlaneConfig) -> MeshIdentity | None:
    """The mesh CA, join token and certificate lifetime, when `--ca` is given (CAError,
    ReconcilerError otherwise, saying what is wrong)."""
    if config.ca is None and config.join_token is None:
        return None
    if config.ca is None or config.join_token is None:
        raise ReconcilerError("--ca and --join-token go together: the CA issues certificates to proxies holding the token")
    try:
        token = check_join_token(config.join_token)
    except ValueError as exc:
        raise ReconcilerError(f"--join-token {exc}") from None
    return MeshIdentity(ca=load_ca(config.ca), join_token=token, cert_lifetime=config.cert_lifetime)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ReconcilerError(f"--listen {address!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.removeprefix("[").removesuffix("]"), int(port)


def run_control_plane(config: ControlPlaneConfig, *, out: TextIO = sys.stdout) -> int:
    """Run the control plane on uvloop until a stop signal; returns the exit code."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s starmesh control-plane %(levelname)s %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop

    _raise_open_files_limit()

    async def main() -> int:
        try:
            plane = ControlPlane(config, out=out)
        except (ReconcilerError, BundleError) as exc:
            print(f"starmesh: error: {exc}", file=sys.stderr, flush=True)
            return 2
        return await plane.run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
