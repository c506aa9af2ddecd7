"""A whole mesh on this machine: the orchestration behind `starmesh up` (no UI here).

    starmesh up
     ├─ control plane   python -m starmesh.cli control-plane --repo STATE/repo --key STATE/keys/signing.key
     │                    --state-dir STATE/control-plane --listen 127.0.0.1:0 --poll-interval 2 --proxy-ttl 10
     │                    --ca STATE/ca  (STARMESH_JOIN_TOKEN=T in its environment; serves https://)
     ├─ sidecar S-V     python -m starmesh.cli proxy --service S --version V --app 127.0.0.1:APP
     │   (one per app     --inbound 127.0.0.1:0 --outbound 127.0.0.1:OUT --admin 127.0.0.1:0
     │    instance)       --state-dir STATE/proxies/S-V --control-plane https://… --trust STATE/keys/signing.pub
     │                    --ca-cert STATE/ca/ca.crt      (STARMESH_JOIN_TOKEN=T in its environment)
     └─ app S-V         python EXAMPLE/SCRIPT --service S --version V
                          --listen 127.0.0.1:APP --outbound 127.0.0.1:OUT

    people ──► S's sidecar inbound (authorization, rate limit) ──► app S ──► its sidecar outbound
               ──mTLS──► the callee's sidecar inbound ──► the callee's app ...

Links between sidecars are mTLS as the policy's mtls modes say (localmesh_identity.py
makes the CA and the join token); `up` itself talks HTTPS to the control plane, trusting
the mesh root, and reads only its operators' route /v1/status, which needs no certificate.

Every child runs in its own process group with its output in STATE/logs (see
localmesh_children.py); the state dir's layout is in localmesh_state.py. APP and OUT
are free loopback ports picked before the start (a port taken in between is retried
with new ones, twice); the other listeners take port 0 and print what they bound.

`LocalMesh` starts the parts in order — `start_control_plane`, `start_instances`,
`wait_synced` (every sidecar runs the release), `wait_routable` (every sidecar can have
the whole endpoint table) — and afterwards answers `status()` (the control plane's
/v1/status, condensed) and `newly_exited()`; `stop()` ends every child. Each step
raises StartFailed naming the part, what went wrong and its log.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from starmesh.cli.localmesh_children import Child, ChildSpec, free_ports, stop_all
from starmesh.cli.localmesh_errors import StartFailed
from starmesh.cli.localmesh_example import AppInstance, Example
from starmesh.cli.localmesh_identity import JOIN_TOKEN_ENV, MeshIdentity
from starmesh.cli.localmesh_state import PolicyRepo, SigningKeys, StateLayout
from starmesh.cli.localmesh_status import MeshStatus, fetch_registered, fetch_status

__all__ = ["ControlPlaneInfo", "Instance", "LocalMesh", "Timing"]

_PORT_ATTEMPTS = 3
_ENDPOINTS_SETTLE = 1.0
"""Seconds after the registry's warm-up for the held endpoint long-polls to be answered and applied."""
_READY = re.compile(r"^ready release (\d+) (sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class Timing:
    """The deadlines and intervals of a local mesh (seconds)."""

    start: float = 60.0
    """For each child to print its start-up lines."""
    sync: float = 60.0
    """For every sidecar to run the release meant for it."""
    stop_grace: float = 10.0
    """Between SIGTERM and SIGKILL when stopping."""
    poll: float = 0.25
    """Between status polls while waiting for the sidecars to sync."""
    repo_poll: float = 2.0
    """The control plane's --poll-interval (ref changes are watched as well)."""
    proxy_ttl: float = 10.0
    """The control plane's --proxy-ttl."""


@dataclass(frozen=True)
class ControlPlaneInfo:
    """The running control plane: its address and the release it started with."""

    address: str
    release_version: int
    bundle: str

    @property
    def url(self) -> str:
        return f"https://{self.address}"


@dataclass(frozen=True)
class Instance:
    """One running app instance and its sidecar: every address, and where the logs are."""

    app: AppInstance
    address: str
    """The app's own listener."""
    outbound: str
    inbound: str
    admin: str
    proxy_id: str
    proxy_log: Path
    app_log: Path

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin}"


def _after(prefix: str) -> Callable[[str], str | None]:
    return lambda line: line[len(prefix) :].strip() if line.startswith(prefix) else None


def _readiness(line: str) -> str | None:
    return line if line.startswith(("ready ", "not ready: ")) else None


def _port_taken(children: list[Child]) -> bool:
    return any("in use" in line.lower() for child in children for line in child.tail())


class LocalMesh:
    """The children of one `starmesh up`, started in order and stopped together."""

    def __init__(
        self,
        example: Example,
        layout: StateLayout,
        repo: PolicyRepo,
        keys: SigningKeys,
        identity: MeshIdentity,
        *,
        timing: Timing = Timing(),
        python: str = sys.executable,
    ) -> None:
        self.example = example
        self.layout = layout
        self.repo = repo
        self.keys = keys
        self.identity = identity
        self.timing = timing
        self.python = python
        self.control_plane: ControlPlaneInfo | None = None
        self.instances: tuple[Instance, ...] = ()
        self._children: list[Child] = []
        self._reported: set[int] = set()
        self._session: aiohttp.ClientSession | None = None
        self._warm_at = 0.0

    # -- start -------------------------------------------------------------------------

    async def _spawn(
        self, name: str, argv: list[str], *, cwd: Path | None = None, env: tuple[tuple[str, str], ...] = ()
    ) -> Child:
        child = await Child.spawn(ChildSpec(name, tuple(argv), self.layout.log(name.replace(" ", "-")), cwd, env))
        self._children.append(child)
        return child

    async def start_control_plane(self) -> ControlPlaneInfo:
        """Start the control plane and wait until it serves a release; StartFailed otherwise."""
        repo, t = self.repo, self.timing
        argv = [
            self.python, "-m", "starmesh.cli", "control-plane",
            "--repo", str(repo.path), "--branch", repo.branch, "--key", str(self.keys.private),
            "--state-dir", str(self.layout.control_plane), "--listen", "127.0.0.1:0",
            "--poll-interval", f"{t.repo_poll:g}", "--proxy-ttl", f"{t.proxy_ttl:g}",
            "--ca", str(self.identity.ca_dir),  # the join token goes in its environment, not `ps`
        ]  # fmt: skip
        if repo.subdir:
            argv += ["--subdir", repo.subdir]
        child = await self._spawn("control-plane", argv, env=((JOIN_TOKEN_ENV, self.identity.join_token),))
        address = await child.expect(_after("listening "), "its `listening` line", t.start)
        # Its registry's warm-up began before it listened (control-plane.md: for half of
        # --proxy-ttl a proxy holding an endpoint table gets no newer one).
        self._warm_at = asyncio.get_running_loop().time() + t.proxy_ttl / 2
        said = await child.expect(_readiness, "a `ready` or `not ready` line", t.start)
        found = _READY.match(said)
        if found is None:
            raise StartFailed(
                f"the control plane is not ready: {said.removeprefix('not ready: ')}\n"
                f"Fix the policy in {repo.policy_root}, commit it, and run starmesh up again "
                f"(`starmesh lint {repo.policy_root}` shows the findings; log: {child.spec.log})"
            )
        self.control_plane = ControlPlaneInfo(address, int(found.group(1)), found.group(2))
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5), connector=aiohttp.TCPConnector(ssl=self._trust_mesh_root())
        )
        return self.control_plane

    def _trust_mesh_root(self) -> ssl.SSLContext:
        """For the control plane's HTTPS: its certificate chains to the mesh root and names 127.0.0.1."""
        try:
            return ssl.create_default_context(cafile=str(self.identity.ca_cert))
        except (OSError, ssl.SSLError) as exc:
            raise StartFailed(f"cannot trust the mesh root {self.identity.ca_cert}: {exc}") from exc

    async def start_instances(self) -> tuple[Instance, ...]:
        """Start every app with its sidecar (all at once) and wait for their start-up lines."""
        tasks = [asyncio.create_task(self._start_instance(app), name=f"start {app.name}") for app in self.example.apps]
        try:
            started = await asyncio.gather(*tasks)
        except BaseException:  # one failed (or we were cancelled): the others stop spawning
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.instances = tuple(started)
        return self.instances

    async def _start_instance(self, app: AppInstance) -> Instance:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            pair = await self._spawn_pair(app)
            try:
                return await self._await_instance(app, *pair)
            except StartFailed:
                failed = list(pair[:2])
                if attempt == _PORT_ATTEMPTS or not _port_taken(failed):
                    raise
                await stop_all(failed, self.timing.stop_grace)  # a port was taken meanwhile: retry
                self._children = [child for child in self._children if child not in failed]
        raise AssertionError("unreachable")

    async def _spawn_pair(self, app: AppInstance) -> tuple[Child, Child, str]:
        assert self.control_plane is not None, "start_control_plane first"
        app_port, out_port = free_ports(2)
        app_address, outbound = f"127.0.0.1:{app_port}", f"127.0.0.1:{out_port}"
        sidecar = await self._spawn(f"proxy {app.name}", [
            self.python, "-m", "starmesh.cli", "proxy", "--service", app.service, "--version", app.version,
            "--app", app_address, "--inbound", "127.0.0.1:0", "--outbound", outbound, "--admin", "127.0.0.1:0",
            "--state-dir", str(self.layout.proxy(app.name)),
            "--control-plane", self.control_plane.url, "--trust", str(self.keys.public),
            "--ca-cert", str(self.identity.ca_cert),
        ], env=((JOIN_TOKEN_ENV, self.identity.join_token),))  # fmt: skip
        process = await self._spawn(f"app {app.name}", [
            self.python, str(app.script), "--service", app.service, "--version", app.version,
            "--listen", app_address, "--outbound", outbound,
        ], cwd=self.example.root)  # fmt: skip
        return sidecar, process, app_address

    async def _await_instance(self, app: AppInstance, sidecar: Child, process: Child, address: str) -> Instance:
        from starmesh.runtime.identity import PROXY_ID_FILE, is_proxy_id

        deadline = self.timing.start
        outbound = await sidecar.expect(_after("outbound "), "its outbound address", deadline)
        inbound = await sidecar.expect(_after("inbound "), "its inbound address", deadline)
        admin = await sidecar.expect(_after("admin "), "its admin address", deadline)
        await sidecar.expect(_readiness, "a `ready` or `not ready` line", deadline)
        listening = await process.expect(_after("listening "), "its `listening` line", deadline)
        if listening != address:
            raise StartFailed(
                f"app {app.name} says it listens on {listening}, not on --listen {address}; "
                f"its sidecar forwards to {address} (fix {app.script}; log: {process.spec.log})"
            )
        id_file = self.layout.proxy(app.name) / PROXY_ID_FILE
        try:
            proxy_id = id_file.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            raise StartFailed(f"proxy {app.name}: cannot read its id from {id_file}: {exc.strerror or exc}") from exc
        if not is_proxy_id(proxy_id):
            raise StartFailed(f"proxy {app.name}: {id_file} does not hold a proxy id (log: {sidecar.spec.log})")
        return Instance(app, address, outbound, inbound, admin, proxy_id, sidecar.spec.log, process.spec.log)

    async def wait_synced(self, progress: Callable[[int, int], None]) -> MeshStatus:
        """Poll /v1/status until every sidecar is synced; `progress(k, n)` on each poll."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timing.sync
        ids = {instance.proxy_id: instance for instance in self.instances}
        while True:
            exited = self.newly_exited()
            if exited:
                raise StartFailed("; ".join(child.describe_exit() for child in exited))
            status = await self.status()
            synced = status.synced(ids)
            progress(len(synced), len(ids))
            if len(synced) == len(ids):
                return status
            if loop.time() >= end:
                raise StartFailed(self._not_synced(status, ids, synced))
            await asyncio.sleep(self.timing.poll)

    async def wait_routable(self) -> None:
        """Wait until every sidecar can have every instance in its endpoint table.

        The control plane's table must list every instance's inbound address; then, as
        proxies holding a table get no newer one during the registry's warm-up (half of
        --proxy-ttl after the control plane started), the warm-up must be over, plus a
        moment for the held long-polls to be answered and applied. (A proxy does not say
        which endpoint table it holds; when it does, this can ask each one instead.)"""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timing.sync
        while missing := await self._unregistered():
            if loop.time() >= end:
                raise StartFailed(
                    f"the control plane's endpoint table lacks {', '.join(missing)} after {self.timing.sync:.0f}s "
                    f"(are those sidecars registering? logs in {self.layout.logs})"
                )
            await asyncio.sleep(self.timing.poll)
        await asyncio.sleep(max(0.0, self._warm_at + _ENDPOINTS_SETTLE - loop.time()))

    async def _unregistered(self) -> list[str]:
        """The instances whose inbound address the control plane's endpoint table lacks."""
        assert self.control_plane is not None and self._session is not None
        listed = await fetch_registered(self._session, self.control_plane.url)
        return [i.app.name for i in self.instances if (i.app.service, i.app.version, i.inbound) not in listed]

    def _not_synced(self, status: MeshStatus, ids: dict[str, Instance], synced: set[str]) -> str:
        states = {proxy.id: proxy for proxy in status.proxies}
        lines = [f"{len(ids) - len(synced)} of {len(ids)} proxies not synced within {self.timing.sync:.0f}s:"]
        for proxy_id, instance in ids.items():
            if proxy_id in synced:
                continue
            seen = states.get(proxy_id)
            state = "not registered" if seen is None else seen.state + (f": {seen.error}" if seen.error else "")
            lines.append(f"  {instance.app.name} ({proxy_id}): {state}; log: {instance.proxy_log}")
        if status.error:
            lines.append(f"  control plane: {status.error}")
        return "\n".join(lines)

    # -- running -----------------------------------------------------------------------

    async def status(self) -> MeshStatus:
        """The control plane's /v1/status, condensed; `reachable` False (with why) when it does not answer."""
        assert self.control_plane is not None and self._session is not None, "start_control_plane first"
        return await fetch_status(self._session, self.control_plane.url)

    def newly_exited(self) -> list[Child]:
        """Children that exited since the last call (each reported once)."""
        exited = [c for c in self._children if c.returncode is not None and c.pid not in self._reported]
        self._reported.update(child.pid for child in exited)
        return exited

    @property
    def entry(self) -> Instance | None:
        """The entry service's first instance (its sidecar's inbound is the way in)."""
        return next((i for i in self.instances if i.app.service == self.example.entry.service), None)

    # -- stop --------------------------------------------------------------------------

    async def stop(self, force: asyncio.Event | None = None) -> list[Child]:
        """Stop every child (SIGTERM, the grace period or `force`, SIGKILL); those killed."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        return await stop_all(self._children, self.timing.stop_grace, force)
