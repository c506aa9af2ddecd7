"""A fleet of simulated proxies: N control channels on one event loop, for tests and bench/fleet.py.

    async with Fleet(FleetConfig(size=1000, control_planes=(url1, url2, url3), trusted=(key,))) as fleet:
        await fleet.wait_registered(timeout=60)
        at = await fleet.wait_converged(2, timeout=60)     # every proxy ACKed release 2
        fleet.totals()                                     # fetches, acks, nacks, failovers

Each proxy is a `SimulatedProxy` (fleet_proxy.py): it registers, heartbeats, long-polls
`/v1/release`, fetches each bundle digest once, verifies the release and the digest
with the proxy's own code, and ACKs or NACKs. All of them share the running event loop
(uvloop in bench/fleet.py) and one aiohttp session, whose connector allows two
connections per proxy (its long-poll and one more: a heartbeat, a fetch, a report).
Proxy i takes the control-plane URLs rotated by i, so a fleet spreads over the
replicas and each proxy fails over to the next one.

The proxies register under `service` (default `fleet`) with distinct loopback
addresses nothing listens on (`127.254.x.y:9`): give the policy a service of that
name that nothing routes to, so no real proxy ever sends traffic there.

The fleet keeps counts, not event lists: per proxy its snapshot (fleet_proxy.py), and
for the fleet how many proxies have ACKed each (version) and each (bundle), with the
time of the newest such ACK, for the versions and bundles some proxy holds now.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp

from starmesh.bundle.keys import PublicKey
from starmesh.runtime.control_http import ControlLimits, ControlPlaneSettings, new_session
from starmesh.runtime.errors import ProxyError
from starmesh.runtime.fleet_proxy import Acked, ProxySnapshot, SimulatedProxy

__all__ = ["Fleet", "FleetConfig", "FleetError", "FleetTotals", "ensure_open_files", "fleet_address"]

log = logging.getLogger("starmesh.fleet")

FILES_PER_PROXY = 2
"""Sockets a simulated proxy may hold at once: its long-poll and one other request."""
SPARE_FILES = 256
"""Open files the fleet's process needs besides its proxies' sockets."""
MAX_FLEET = 250 * 256
"""Proxies a fleet can give distinct addresses (fleet_address)."""


class FleetError(ProxyError):
    """The fleet cannot start (too many proxies for the open-file limit) or did not converge."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What a fleet is: how many proxies, which control planes, which keys they trust.

    `limits` are the proxy's own (control_http.ControlLimits); `seed` makes the
    backoff jitter and heartbeat phases repeatable."""

    size: int
    control_planes: tuple[str, ...]
    trusted: tuple[PublicKey, ...]
    service: str = "fleet"
    version: str = "v1"
    id_prefix: str = "fleet-"
    limits: ControlLimits = ControlLimits()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class FleetTotals:
    """Sums over the fleet's proxies."""

    proxies: int
    registered: int
    fetches: int
    acks: int
    nacks: int
    failovers: int
    fetched: dict[str, int] = field(default_factory=dict)
    """Fetches per digest, over the fleet (each proxy's last few digests)."""


def fleet_address(index: int) -> str:
    """Proxy `index`'s registered address: distinct, on loopback, where nothing listens."""
    if not 0 <= index < MAX_FLEET:
        raise ValueError(f"a fleet has at most {MAX_FLEET} proxies (index {index})")
    return f"127.254.{index // 250}.{index % 250 + 1}:9"


def ensure_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit when below `needed`; the soft limit now.

    FleetError when even the hard limit is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FleetError(
            f"this fleet needs about {needed} open files, but the hard limit is {hard}: "
            f"raise it (ulimit -Hn, or LimitNOFILE=) or run fewer proxies"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else needed


class _Tally:
    """How many proxies have ACKed each version and each bundle, and when the newest ACK came.

    Keys no proxy holds any more are dropped, so this is bounded by the fleet's size."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.registered = 0
        self.counts: dict[int | str, int] = {}
        self.newest: dict[int | str, float] = {}
        self._changed = asyncio.Event()

    def register(self) -> None:
        self.registered += 1
        self._wake()

    def ack(self, old: Acked | None, new: Acked) -> None:
        now = self.clock()
        for key in () if old is None else _keys(old):
            self.counts[key] -= 1
            if not self.counts[key]:
                del self.counts[key], self.newest[key]
        for key in _keys(new):
            self.counts[key] = self.counts.get(key, 0) + 1
            self.newest[key] = now
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until `done()` holds (True) or `timeout` s pass (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return done()
        return True


def _keys(acked: Acked) -> tuple[int | str, ...]:
    version, bundle = acked
    return (bundle,) if version is None else (version, bundle)


class Fleet:
    """N simulated proxies on the running loop (see the module docstring); `start`, then `close`.

    `clock` stamps ACKs (wait_converged's answer): time.monotonic, comparable across processes."""

    def __init__(self, config: FleetConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= config.size <= MAX_FLEET:
            raise ValueError(f"a fleet has 1 to {MAX_FLEET} proxies, not {config.size}")
        if not config.control_planes:
            raise ValueError("a fleet needs at least one control-plane URL")
        if not config.trusted:
            raise ValueError("a fleet needs at least one trusted public key")
        self.config = config
        self._clock = clock
        self.proxies: list[SimulatedProxy] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tally: _Tally | None = None

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Raise the open-file limit if needed, open the session, start every proxy."""
        config = self.config
        ensure_open_files(FILES_PER_PROXY * config.size + SPARE_FILES)
        loop = asyncio.get_running_loop()
        tally = self._tally = _Tally(self._clock)
        connections = FILES_PER_PROXY * config.size + 16
        session = self._session = new_session(connections=connections, user_agent="starmesh-fleet")
        rng = random.Random(config.seed)
        urls = config.control_planes
        for index in range(config.size):
            turn = index % len(urls)
            settings = ControlPlaneSettings(
                urls=urls[turn:] + urls[:turn], trusted=config.trusted, proxy_id=f"{config.id_prefix}{index:05d}",
                service=config.service, version=config.version, limits=config.limits,
            )  # fmt: skip
            proxy = SimulatedProxy(settings, fleet_address(index), session, rng=random.Random(rng.random()),
                                   on_registered=tally.register, on_acked=tally.ack)  # fmt: skip
            self.proxies.append(proxy)
            self._tasks.append(loop.create_task(proxy.run(), name=f"simulated proxy {settings.proxy_id}"))
        log.info("fleet: %d simulated proxies against %s", config.size, ", ".join(urls))

    async def close(self) -> None:
        """Stop every proxy and close the session (idempotent)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- what the fleet knows ------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.config.size

    def snapshots(self) -> list[ProxySnapshot]:
        return [proxy.snapshot() for proxy in self.proxies]

    def totals(self) -> FleetTotals:
        fetched: dict[str, int] = {}
        for proxy in self.proxies:
            for digest, count in proxy.snapshot().fetched.items():
                fetched[digest] = fetched.get(digest, 0) + count
        return FleetTotals(
            proxies=len(self.proxies), registered=self._running().registered,
            fetches=sum(p.fetches for p in self.proxies), acks=sum(p.acks for p in self.proxies),
            nacks=sum(p.nacks for p in self.proxies), failovers=sum(p.targets.failovers for p in self.proxies),
            fetched=fetched,
        )  # fmt: skip

    def acked(self, target: int | str) -> int:
        """How many proxies have ACKed release `target` (a version) or bundle `target` (a digest)."""
        return self._running().counts.get(target, 0)

    async def wait_registered(self, timeout: float) -> None:
        """Return once every proxy has had a heartbeat accepted; FleetError after `timeout` s."""
        tally = self._running()
        if not await tally.until(lambda: tally.registered >= self.size, timeout):
            raise FleetError(f"{self.size - tally.registered} of {self.size} simulated proxies did not register "
                             f"within {timeout:g} s{self._example(lambda p: not p.registered)}")  # fmt: skip

    async def wait_converged(self, target: int | str, timeout: float) -> float:
        """Return once every proxy has ACKed `target` (a release version, or a bundle digest):
        the clock's time of the last of those ACKs. FleetError after `timeout` s, naming one
        proxy that is behind."""
        tally = self._running()
        if not await tally.until(lambda: tally.counts.get(target, 0) >= self.size, timeout):
            behind = self.size - tally.counts.get(target, 0)
            what = f"release {target}" if isinstance(target, int) else f"bundle {target}"
            raise FleetError(f"{behind} of {self.size} simulated proxies did not ACK {what} within {timeout:g} s"
                             f"{self._example(lambda p: target not in _keys(p.acked or (None, '')))}")  # fmt: skip
        return tally.newest[target]

    def _example(self, behind: Callable[[SimulatedProxy], bool]) -> str:
        for proxy in self.proxies:
            if behind(proxy):
                s = proxy.snapshot()
                return (f"; e.g. {s.id}: runs release {s.release_version} ({s.bundle}), ACKed {s.acked_version}, "
                        f"{s.nacks} NACKs, last error: {s.last_error}, control plane {proxy.targets.current} "
                        f"(last failure: {proxy.targets.last_failure})")  # fmt: skip
        return ""

    def _running(self) -> _Tally:
        if self._tally is None:
            raise FleetError("the fleet has not been started (await fleet.start())")
        return self._tally
