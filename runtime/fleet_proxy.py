"""One simulated proxy: the control channel of `starmesh proxy`, and nothing else.

A `SimulatedProxy` speaks to the control plane exactly as a proxy's control-plane client
(control.py, control_report.py) does, with the proxy's own pieces: `poll_releases` (the
release long-poll), `Channel.request` (byte caps, deadlines), `Targets` (failover across
the `--control-plane` URLs), `Backoff` (jittered), `Reporter` (heartbeats and ACK/NACK
reports), `verify_release` (signature, payload type, trusted key, version, expiry):

    heartbeat  POST /v1/proxies/ID {service, version, address, release_version, bundle,
               requests_total: 0} every `heartbeat_seconds` the answer names (Reporter;
               the first wait is a random part of it, so a fleet does not beat in step)
    releases   GET /v1/release?after=N&proxy=ID&wait=30
                 │ 200 ─► verify_release ──── refused ───► NACK {version, bundle, error}
                 ▼                                         then 1 s doubling to 60 s
               GET /v1/bundles/<digest>, once per digest ─► sha256 ── mismatch ──► NACK
                 ▼
               ACK POST /v1/proxies/ID/status {version, bundle, error: null} (Reporter)

What it leaves out is the data plane: no listeners, no route table, no bundle decoding,
validation or golden requests, no last-known-good on disk, no endpoints long-poll. A
bundle's bytes are hashed and dropped; the proxy remembers the digests it has checked
(the last `KNOWN_DIGESTS`), so a release naming one of them is applied without a fetch
(a real proxy re-fetches only a digest it no longer has; here every fetch is counted).

It never owns the connection pool: its `Channel` is given the fleet's one session. Plain
HTTP only (no `--ca-cert`, no workload certificate).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.errors import BundleError
from starmesh.bundle.release import verify_release
from starmesh.runtime.control import poll_releases
from starmesh.runtime.control_http import Answer, Backoff, Channel, ControlPlaneSettings, snippet
from starmesh.runtime.control_report import Reporter
from starmesh.runtime.errors import ControlPlaneError

__all__ = ["KNOWN_DIGESTS", "ProxySnapshot", "SimulatedProxy"]

log = logging.getLogger("starmesh.fleet")

KNOWN_DIGESTS = 16
"""Digests a simulated proxy remembers (checked ones, and fetch counts): a bound."""

Acked = tuple[int | None, str]
"""What an ACK the control plane accepted named: (release version, bundle digest)."""


@dataclass(frozen=True, slots=True)
class _Running:
    """What a simulated proxy runs, as its heartbeat says it (control_report.Running)."""

    release_version: int | None
    digest: str


@dataclass(frozen=True, slots=True)
class ProxySnapshot:
    """One simulated proxy's state: what it runs and what it did to get there.

    `fetched` counts fetches per digest (the last KNOWN_DIGESTS digests); `failovers`
    counts moves to the next control-plane URL."""

    id: str
    urls: tuple[str, ...]
    registered: bool
    release_version: int | None
    bundle: str | None
    acked_version: int | None
    acked_bundle: str | None
    fetches: int
    fetched: dict[str, int]
    acks: int
    nacks: int
    failovers: int
    last_error: str | None


class SimulatedProxy:
    """A proxy's control channel (see the module docstring); `run` until cancelled.

    `on_registered()` hears its first accepted heartbeat; `on_acked(old, new)` every ACK
    the control plane accepted (old: the previous one, or None)."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        address: str,
        session: aiohttp.ClientSession,
        *,
        rng: random.Random,
        on_registered: Callable[[], None] = lambda: None,
        on_acked: Callable[[Acked | None, Acked], None] = lambda old, new: None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.address = address
        self.channel = Channel(settings, session=session)
        self.targets = self.channel.targets
        self._rng = rng
        self._on_registered = on_registered
        self._on_acked = on_acked
        self.reporter = Reporter(
            self.channel, applied=self._running, address=lambda: address, rng=rng, requests_total=lambda: 0,
            on_heartbeat=self._heartbeat_accepted, on_accepted=self._report_accepted, stagger=True,
        )  # fmt: skip
        self.registered = False
        self.release_version: int | None = None
        self.bundle: str | None = None
        self.acked: Acked | None = None
        self.fetches = 0
        self._fetched: OrderedDict[str, int] = OrderedDict()
        self._checked: OrderedDict[str, None] = OrderedDict()
        self.acks = 0
        self.nacks = 0
        self.last_error: str | None = None
        self._nack_backoff = Backoff(self.limits.nack_backoff_base, self.limits.nack_backoff_cap, rng)
        self._nacked: int | None = None

    @property
    def id(self) -> str:
        return self.settings.proxy_id

    def snapshot(self) -> ProxySnapshot:
        acked = self.acked
        return ProxySnapshot(
            id=self.id, urls=self.settings.urls, registered=self.registered,
            release_version=self.release_version, bundle=self.bundle,
            acked_version=None if acked is None else acked[0], acked_bundle=None if acked is None else acked[1],
            fetches=self.fetches, fetched=dict(self._fetched), acks=self.acks, nacks=self.nacks,
            failovers=self.targets.failovers, last_error=self.last_error,
        )  # fmt: skip

    async def run(self) -> None:
        """The heartbeat and release loops, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(_supervised(self.id, "heartbeats", self.reporter.run))
            group.create_task(_supervised(self.id, "releases", self._release_loop))

    # -- heartbeats and reports (the Reporter's) ----------------------------------------

    def _running(self) -> _Running | None:
        return None if self.bundle is None else _Running(self.release_version, self.bundle)

    def _heartbeat_accepted(self) -> None:
        if not self.registered:
            self.registered = True
            self._on_registered()

    def _report_accepted(self, version: int | None, bundle: str | None, error: str | None) -> None:
        if error is None and bundle is not None:
            old, self.acked = self.acked, (version, bundle)
            self._on_acked(old, self.acked)

    # -- releases ----------------------------------------------------------------------

    async def _release_loop(self) -> None:
        async def too_large(error: str) -> None:
            await self._nack(None, None, error)

        await poll_releases(self.channel, self._rng, after=lambda: self.release_version or 0,
                            on_release=self._on_release, on_too_large=too_large)  # fmt: skip

    async def _on_release(self, url: str, answer: Answer) -> bool:
        """Verify, fetch, check, ACK; True when acted on (applied or NACKed)."""
        header = answer.headers.get("x-starmesh-release-version", "")
        claimed = int(header) if header.isdigit() and len(header) < 19 else None
        try:
            verified = verify_release(answer.body, self.settings.trusted, applied_version=self.release_version,
                                      applied_digest=self.bundle, now=datetime.now(UTC))  # fmt: skip
        except BundleError as exc:
            await self._nack(claimed, None, f"release {claimed or '(unknown version)'} from {url} refused: {exc}")
            return True
        release = verified.release
        if verified.unchanged:
            return False
        try:
            await self._check_bundle(url, release.bundle)
        except (ControlPlaneError, BundleError) as exc:
            await self._nack(release.version, release.bundle, f"release {release.version}: {exc}")
            return True
        self.release_version, self.bundle = release.version, release.bundle
        self._nacked = None
        self._nack_backoff.reset()
        self.acks += 1
        await self.reporter.report(release.version, release.bundle, None)
        return True

    async def _check_bundle(self, url: str, digest: str) -> None:
        """Fetch the bundle (unless this digest was checked before) and check its sha256."""
        if digest in self._checked:
            self._checked.move_to_end(digest)
            return
        self.fetches += 1
        _remember(self._fetched, digest, self._fetched.get(digest, 0) + 1)
        answer = await self.channel.request("GET", f"{url}/v1/bundles/{digest}", cap=self.limits.bundle_bytes,
                                            deadline=self.limits.bundle_seconds, what=f"bundle {digest}")
        if answer.status != 200:
            raise ControlPlaneError(f"fetching bundle {digest} from {url}: HTTP {answer.status}: {snippet(answer.body)}")
        actual = digest_of(answer.body)
        if actual != digest:
            raise BundleError(f"bundle digest mismatch: the release names {digest}, the bytes hash to {actual}")
        _remember(self._checked, digest, None)

    async def _nack(self, version: int | None, bundle: str | None, reason: str) -> None:
        """Report the NACK, then wait 1 s doubling to 60 s while the same version is NACKed."""
        self.nacks += 1
        self.last_error = reason
        await self.reporter.report(version, bundle, reason)
        if version != self._nacked:
            self._nacked = version
            self._nack_backoff.reset()
        await asyncio.sleep(self._nack_backoff.next())


def _remember(seen: OrderedDict[str, Any], key: str, value: Any) -> None:
    """Put `key` last in a bounded map, dropping the oldest past KNOWN_DIGESTS."""
    seen[key] = value
    seen.move_to_end(key)
    while len(seen) > KNOWN_DIGESTS:
        seen.popitem(last=False)


async def _supervised(proxy_id: str, name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a loop for good: a bug that escapes it is logged and the loop starts again."""
    while True:
        try:
            await loop()
        except Exception:
            log.exception("simulated proxy %s: the %s loop failed (a bug); restarting it in 1 s", proxy_id, name)
            await asyncio.sleep(1.0)
