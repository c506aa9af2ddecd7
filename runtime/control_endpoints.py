"""Following the control plane's endpoint table: one long-poll loop, applied as it changes.

    GET /v1/endpoints?after=N&wait=30
        204: nothing newer ─► poll again (at once; an answer faster than
             `quick_answer_seconds` backs off, so a broken control plane cannot spin us)
        200 {"version": V, "endpoints": {...}} ─► parse_endpoints ─► Applier.update_endpoints; N = V
        a table that cannot be used ─► logged once, the current table stays, back off
        a failed request ─► the next URL (`Targets`), N = 0 (a restarted control plane
                             counts from scratch), back off

It shares the client's `Channel` (session, URLs, limits) with the release loop
(control.py) and the heartbeats (control_report.py).
"""

from __future__ import annotations

import asyncio
import logging
import random

import msgspec

from starmesh.runtime.apply import Applier
from starmesh.runtime.control_http import Backoff, Channel, snippet
from starmesh.runtime.endpoints import parse_endpoints
from starmesh.runtime.errors import ConfigRejected, ControlPlaneError, EndpointsError

__all__ = ["EndpointsFollower"]

log = logging.getLogger("starmesh.proxy")


class _EndpointsAnswer(msgspec.Struct, frozen=True):
    version: int
    endpoints: msgspec.Raw


class EndpointsFollower:
    """Keeps the applier's endpoint table in step with the control plane's (`run` until cancelled)."""

    def __init__(self, channel: Channel, applier: Applier, *, rng: random.Random) -> None:
        self.channel = channel
        self.limits = channel.limits
        self.applier = applier
        self._rng = rng

    async def run(self) -> None:
        """The long-poll loop (see the module docstring)."""
        limits = self.limits
        targets = self.channel.targets
        backoff = Backoff(limits.backoff_base, limits.backoff_cap, self._rng)
        loop = asyncio.get_running_loop()
        after = 0  # after a failure, 0 again: a restarted control plane counts from scratch
        refused: str | None = None
        while True:
            url = targets.current
            asked = loop.time()
            try:
                version = await self.poll(url, after)
            except ControlPlaneError as exc:
                targets.failed(url, str(exc))
                after = 0
                await asyncio.sleep(backoff.next())
                continue
            except ConfigRejected as exc:  # it answered, with a table that cannot be used
                if str(exc) != refused:
                    log.error("endpoint table refused, keeping the current one: %s", exc)
                    refused = str(exc)
                await asyncio.sleep(backoff.next())
                continue
            refused = None
            if version is None and loop.time() - asked < limits.quick_answer_seconds:
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            if version is not None:
                after = version

    async def poll(self, url: str, after: int) -> int | None:
        """One long-poll; the new table's version once applied, None when nothing was newer.

        ControlPlaneError when the request fails; ConfigRejected for a table that cannot be used."""
        limits = self.limits
        params = {"after": str(after), "wait": f"{limits.wait_seconds:g}"}
        answer = await self.channel.request("GET", url + "/v1/endpoints", params=params, cap=limits.endpoints_bytes,
                                            deadline=limits.wait_seconds + limits.poll_slack_seconds, what="endpoints")
        if answer.status == 204:
            self.channel.targets.succeeded(url)
            return None
        if answer.status != 200:
            raise ControlPlaneError(f"endpoints from {url}: HTTP {answer.status}: {snippet(answer.body)}")
        where = f"endpoints from {url}"
        try:
            decoded = msgspec.json.decode(answer.body, type=_EndpointsAnswer)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise EndpointsError(f'{where}: expected {{"version": N, "endpoints": {{...}}}}: {exc}') from exc
        table = parse_endpoints(bytes(decoded.endpoints), where)
        self.channel.targets.succeeded(url)
        await self.applier.update_endpoints(table, version=decoded.version)
        return decoded.version
