"""The proxy's control-plane client: releases, endpoints and heartbeats over long-poll HTTP.

One `ControlPlaneClient` per proxy, one aiohttp session (`control_http.Channel`), three loops:

    release    GET /v1/release?after=N&proxy=ID&wait=30     N: the live release, or 0
                 │ 204: nothing newer ─► poll again
                 ▼ 200: a DSSE envelope
               verify_release: signature (before parsing), payload      ── refused ──┐
                 │ type, trusted key, version > H, not expired                      │
                 ▼                                                                  │
               GET /v1/bundles/<digest>: 64 MiB cap, deadline          ── failed ───┤
                 ▼                                                                  │
               Applier.apply(origin="control-plane"): digest, runtime   ── refused ──┤
                 │ validation, golden requests, swap, persist + envelope            │
                 ▼                                                                  ▼
               ACK {version, bundle, error: null}          NACK {version, bundle, error: "<why>"},
                                                           then wait 1 s doubling to 60 s (same
                                                           version) before polling again
    endpoints  GET /v1/endpoints?after=N&wait=30 ─► parse_endpoints ─► Applier.update_endpoints
               (control_endpoints.py)
    heartbeat  POST /v1/proxies/ID; reports go to POST /v1/proxies/ID/status (control_report.py)

Every request has a byte cap and a deadline (`control_http.Channel.request`). Any failure
moves to the next `--control-plane` URL and waits a jittered exponential backoff (0.2 s
doubling to 10 s); a long-poll answered at once with nothing to do backs off too, so a
broken control plane cannot spin the proxy. The data plane never waits on any of this: the
live table stays until a verified, validated replacement is swapped in.

`after` is the live release, while the check is against the high-water mark H (the
highest release ever applied here, persisted). They differ only after a start from an
older last-known-good generation (the newest was unusable): then the control plane's
newest release, H itself, comes back and is applied again (the same version and bundle
as H is no replay), while anything older than H is refused.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from starmesh.bundle.errors import BundleError
from starmesh.bundle.release import Release, verify_release
from starmesh.runtime.apply import Applier, ApplyResult
from starmesh.runtime.control_http import Answer, Backoff, Channel, ControlLimits, ControlPlaneSettings, snippet
from starmesh.runtime.control_endpoints import EndpointsFollower
from starmesh.runtime.control_report import Reporter
from starmesh.runtime.errors import ControlPlaneError, RejectReason, ResponseTooLarge

__all__ = ["ControlLimits", "ControlPlaneClient", "ControlPlaneSettings", "poll_releases"]

log = logging.getLogger("starmesh.proxy")


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def _supervised(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a loop for good: a bug that escapes it is logged and the loop starts again."""
    while True:
        try:
            await loop()
        except Exception:
            log.exception("the control-plane %s loop failed (a proxy bug); restarting it in 1 s", name)
            await asyncio.sleep(1.0)


async def poll_releases(
    channel: Channel,
    rng: random.Random,
    *,
    after: Callable[[], int],
    on_release: Callable[[str, Answer], Awaitable[bool]],
    on_too_large: Callable[[str], Awaitable[None]],
) -> None:
    """The release long-poll (the module docstring's `release` loop), for good.

    Asks the current target for a release newer than `after()`; `on_release(url, answer)`
    takes a 200 and says whether it acted (applied, or NACKed and waited); `on_too_large`
    NACKs an envelope over the byte cap. Failures move to the next URL and back off, and so
    does an answer at once with nothing to do, so a broken control plane cannot spin the
    caller. The proxy runs it, and so do the fleet's simulated proxies (fleet_proxy.py)."""
    limits = channel.limits
    backoff = Backoff(limits.backoff_base, limits.backoff_cap, rng)
    loop = asyncio.get_running_loop()
    while True:
        url = channel.targets.current
        params = {"after": str(after()), "proxy": channel.settings.proxy_id, "wait": f"{limits.wait_seconds:g}"}
        asked = loop.time()
        try:
            answer = await channel.request("GET", url + "/v1/release", params=params, cap=limits.envelope_bytes,
                                           deadline=limits.wait_seconds + limits.poll_slack_seconds, what="release")
        except ResponseTooLarge as exc:
            channel.targets.succeeded(url)
            await on_too_large(f"release refused: {exc}")
            continue
        except ControlPlaneError as exc:
            channel.targets.failed(url, str(exc))
            await asyncio.sleep(backoff.next())
            continue
        if answer.status not in (200, 204):
            channel.targets.failed(url, f"release from {url}: HTTP {answer.status}: {snippet(answer.body)}")
            await asyncio.sleep(backoff.next())
            continue
        channel.targets.succeeded(url)
        acted = answer.status == 200 and await on_release(url, answer)
        if not acted and loop.time() - asked < limits.quick_answer_seconds:
            await asyncio.sleep(backoff.next())  # answered at once with nothing to do: do not spin
        else:
            backoff.reset()


class ControlPlaneClient:
    """Keeps the proxy's config in step with the control plane (see the module docstring).

    `address` gives the inbound listener's bound address (what peers call); `on_applied`
    hears every successful control-plane apply (the proxy prints `applied release N ...`);
    `requests_total` counts the requests answered so far (heartbeats report it)."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        applier: Applier,
        *,
        address: Callable[[], str],
        on_applied: Callable[[ApplyResult], None] = lambda result: None,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = _utc_now,
        requests_total: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.applier = applier
        self.channel = Channel(settings)
        self.targets = self.channel.targets
        self._on_applied = on_applied
        self._rng = rng or random.Random()
        self._now = now
        self.reporter = Reporter(
            self.channel, applied=lambda: applier.applied, address=address, rng=self._rng, requests_total=requests_total
        )
        self.endpoints = EndpointsFollower(self.channel, applier, rng=self._rng)
        self._tasks: list[asyncio.Task[None]] = []
        self._nack_backoff = Backoff(self.limits.nack_backoff_base, self.limits.nack_backoff_cap, self._rng)
        self._nacked: int | None = None  # the version the NACKs in a row (counted by `_nack_backoff`) are of

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the session and start the three loops."""
        log.info("control plane: %s as proxy %s", ", ".join(self.settings.urls), self.settings.proxy_id)
        self.channel.open()
        for name, loop in (("heartbeats", self.reporter.run), ("releases", self._release_loop),
                           ("endpoints", self.endpoints.run)):
            task = asyncio.get_running_loop().create_task(_supervised(name, loop), name=f"control plane {name}")
            self._tasks.append(task)

    async def close(self) -> None:
        """Stop the loops and close the session."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.channel.close()

    def to_json(self) -> dict[str, object]:
        """`/config`'s `control_plane` block."""
        return {**self.targets.to_json(), "proxy_id": self.settings.proxy_id}

    def waiting_for(self) -> str:
        """What the proxy is waiting for, for a not-ready reason (with the last error, if any)."""
        why = f"waiting for a release from the control plane at {self.targets.current}"
        if not self.targets.connected and self.targets.last_failure:
            why += f" (last error: {self.targets.last_failure})"
        refused = self.applier.last_error
        if refused is not None and refused.origin == "control-plane":
            why += f"; the last one was refused: {refused.error}"
        return why

    # -- releases ------------------------------------------------------------------

    async def _release_loop(self) -> None:
        def after() -> int:
            applied = self.applier.applied
            return applied.release_version if applied is not None and applied.release_version is not None else 0

        async def too_large(error: str) -> None:
            await self._refuse(None, None, error, "release-refused")

        await poll_releases(self.channel, self._rng, after=after, on_release=self._on_release, on_too_large=too_large)

    async def _on_release(self, url: str, answer: Answer) -> bool:
        """Verify, fetch, apply, report. True when it was acted on: applied, or refused (and the
        NACK backoff waited); False for the release already live."""
        header = answer.headers.get("x-starmesh-release-version", "")
        claimed = int(header) if header.isdigit() and len(header) < 19 else None
        mark = self.applier.high_water
        now = self._now()
        try:
            verified = verify_release(
                answer.body,
                self.settings.trusted,
                applied_version=None if mark is None else mark.version,
                applied_digest=None if mark is None else mark.bundle,
                now=now,
            )
        except BundleError as exc:
            await self._refuse(
                claimed, None, f"release {claimed or '(unknown version)'} from {url} refused: {exc}", "release-refused"
            )
            return True
        release = verified.release
        applied = self.applier.applied
        if verified.unchanged:
            if applied is not None and (applied.release_version, applied.digest) == (release.version, release.bundle):
                return False
            # The high-water release, applied here before but not live now (its generation
            # on disk was unusable): it may be applied again, if it has not expired.
            if release.expires <= now:
                await self._refuse(release.version, release.bundle,
                                   f"release {release.version} from {url} refused: it expired at {release.expires_at}",
                                   "release-refused")
                return True
        try:
            data = await self._bundle_for(url, release)
        except ControlPlaneError as exc:
            await self._refuse(release.version, release.bundle,
                               f"release {release.version}: fetching bundle {release.bundle} failed: {exc}",
                               "fetch-failed")
            return True
        result = await self.applier.apply(
            data,
            expected_digest=release.bundle,
            release_version=release.version,
            origin="control-plane",
            envelope=answer.body,
        )
        if not result.ok:
            await self._nack(release.version, release.bundle, f"release {release.version}: {result.error}")
            return True
        self._nacked = None
        self._nack_backoff.reset()
        self._on_applied(result)
        await self.reporter.report(release.version, release.bundle, None)
        return True

    async def _bundle_for(self, url: str, release: Release) -> bytes:
        applied = self.applier.applied
        if applied is not None and applied.digest == release.bundle:
            return applied.data  # a re-issue or rollback to the live bundle: nothing to fetch
        answer = await self.channel.request("GET", f"{url}/v1/bundles/{release.bundle}", cap=self.limits.bundle_bytes,
                                     deadline=self.limits.bundle_seconds, what=f"bundle {release.bundle}")
        if answer.status != 200:
            raise ControlPlaneError(f"bundle {release.bundle} from {url}: HTTP {answer.status}: {snippet(answer.body)}")
        return answer.body

    async def _refuse(self, version: int | None, bundle: str | None, error: str, reason: RejectReason) -> None:
        """A release refused before it reached the applier: record it (/config last_error, counted
        under `reason`), NACK it."""
        self.applier.reject("control-plane", error, reason=reason, digest=bundle, release_version=version)
        await self._nack(version, bundle, error)

    async def _nack(self, version: int | None, bundle: str | None, reason: str) -> None:
        """Report the NACK, then wait before polling again: 1 s doubling to 60 s while the same version is NACKed."""
        await self.reporter.report(version, bundle, reason)
        if version != self._nacked:
            self._nacked = version
            self._nack_backoff.reset()
        await asyncio.sleep(self._nack_backoff.next())
