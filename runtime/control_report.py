"""Heartbeats and ACK/NACK reports: what the control plane knows about this proxy.

    POST /v1/proxies/ID          {service, version, address, release_version, bundle,
                                 requests_total} every `heartbeat_seconds` the answer names
                                 (5 s until it does, kept within 0.1–60 s)
    POST /v1/proxies/ID/status   {version, bundle, error}: ACK (error null) or NACK (the reason)

The heartbeat registers the proxy (its inbound address goes into the endpoint table)
and says what it runs, and how many requests it has answered since it started
(`requests_total`, both directions: the control plane derives its request rate). A
report that does not get through is kept, only the latest one (a bound), and sent
again after the next heartbeat; a 404 (the control plane does not know this id yet,
or forgot it) gets a heartbeat and one more try. Failures move the shared `Targets`
to the next URL and back off like the other loops.

What the reporter needs to know about the proxy is small and given as callables: what
it runs (`Running`: a release version and a bundle digest; runtime/apply.py's
`AppliedConfig` is one), its address, its request count. So the simulated proxies of
fleet_proxy.py, which run no route table, report with this same code; they also listen
to the outcome (`on_heartbeat`, `on_accepted`) and spread a fleet's first heartbeats
(`stagger`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from starmesh.runtime.control_http import Backoff, Channel, snippet
from starmesh.runtime.errors import ControlPlaneError

__all__ = ["Reporter", "Running"]

log = logging.getLogger("starmesh.proxy")

_MIN_HEARTBEAT = 0.1
_MAX_HEARTBEAT = 60.0


class _HeartbeatAnswer(msgspec.Struct, frozen=True):
    heartbeat_seconds: float | None = None


class Running(Protocol):
    """What the heartbeat says the proxy runs (runtime/apply.py's `AppliedConfig` is one)."""

    @property
    def release_version(self) -> int | None: ...

    @property
    def digest(self) -> str: ...


class Reporter:
    """Sends heartbeats (`run`) and ACK/NACK reports (`report`) over the client's channel.

    `applied` gives what the proxy runs (None: nothing yet); `address` the inbound
    listener's bound address; `requests_total` the requests answered so far (the
    telemetry recorder's count; without it the heartbeat leaves the field out).
    `on_heartbeat()` hears every accepted heartbeat; `on_accepted(version, bundle, error)`
    every report the control plane accepted (2xx). `stagger` makes the first wait after a
    heartbeat a random part of the interval (a fleet started at once does not heartbeat
    in one burst; a real proxy starts on its own and does not need it)."""

    def __init__(
        self,
        channel: Channel,
        *,
        applied: Callable[[], Running | None],
        address: Callable[[], str],
        rng: random.Random,
        requests_total: Callable[[], int] | None = None,
        on_heartbeat: Callable[[], None] = lambda: None,
        on_accepted: Callable[[int | None, str | None, str | None], None] = lambda version, bundle, error: None,
        stagger: bool = False,
    ) -> None:
        self.channel = channel
        self.settings = channel.settings
        self.limits = channel.limits
        self._applied = applied
        self._address = address
        self._requests_total = requests_total
        self._on_heartbeat = on_heartbeat
        self._on_accepted = on_accepted
        self._stagger = stagger
        self._rng = rng
        self.heartbeat_seconds = self.limits.heartbeat_seconds
        self._pending: dict[str, Any] | None = None

    async def report(self, version: int | None, bundle: str | None, error: str | None) -> None:
        """ACK (error None) or NACK; kept and re-sent after the next heartbeat if it does not get through."""
        self._pending = {"version": version, "bundle": bundle, "error": error}
        await self._send()

    async def _send(self, *, retried: bool = False) -> None:
        report = self._pending
        if report is None:
            return
        targets = self.channel.targets
        url = targets.current
        try:
            answer = await self.channel.request(
                "POST", f"{url}/v1/proxies/{self.settings.proxy_id}/status", cap=self.limits.answer_bytes,
                deadline=self.limits.request_seconds, what="status report", body=report,
            )
        except ControlPlaneError as exc:
            targets.failed(url, str(exc))
            return
        targets.succeeded(url)
        if answer.status == 404 and not retried:  # not registered yet (or forgotten): heartbeat, then again
            try:
                await self.heartbeat(url)
            except ControlPlaneError as exc:
                targets.failed(url, str(exc))
                return
            await self._send(retried=True)
            return
        if self._pending is report:
            self._pending = None
        if answer.status >= 300:
            log.warning("status report %s to %s answered HTTP %s: %s", report, url, answer.status, snippet(answer.body))
        else:
            self._on_accepted(report["version"], report["bundle"], report["error"])

    async def heartbeat(self, url: str) -> None:
        """One heartbeat to `url`; takes the interval from the answer. ControlPlaneError when refused."""
        applied = self._applied()
        body: dict[str, Any] = {
            "service": self.settings.service,
            "version": self.settings.version,
            "address": self._address(),
            "release_version": None if applied is None else applied.release_version,
            "bundle": None if applied is None else applied.digest,
        }
        if self._requests_total is not None:
            body["requests_total"] = self._requests_total()
        answer = await self.channel.request(
            "POST", f"{url}/v1/proxies/{self.settings.proxy_id}", cap=self.limits.answer_bytes,
            deadline=self.limits.request_seconds, what="heartbeat", body=body,
        )
        if answer.status >= 300:
            raise ControlPlaneError(f"heartbeat (POST {url}): HTTP {answer.status}: {snippet(answer.body)}")
        self.channel.targets.succeeded(url)
        try:
            seconds = msgspec.json.decode(answer.body, type=_HeartbeatAnswer).heartbeat_seconds
        except (msgspec.ValidationError, msgspec.DecodeError):
            seconds = None
        if seconds is not None:
            self.heartbeat_seconds = min(_MAX_HEARTBEAT, max(_MIN_HEARTBEAT, seconds))
        self._on_heartbeat()

    async def run(self) -> None:
        """The heartbeat loop (runs until cancelled); a kept report follows each heartbeat."""
        backoff = Backoff(self.limits.backoff_base, self.limits.backoff_cap, self._rng)
        phase = self._stagger
        while True:
            url = self.channel.targets.current
            try:
                await self.heartbeat(url)
            except ControlPlaneError as exc:
                self.channel.targets.failed(url, str(exc))
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            await self._send()
            await asyncio.sleep(self.heartbeat_seconds * (self._rng.random() if phase else 1.0))
            phase = False
