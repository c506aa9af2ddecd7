"""Mirroring: a fire-and-forget copy of a share of requests to another version.

The copy goes to one endpoint of the mirror version with `Host: <service>-shadow`
(DESIGN.md). The request never waits for it and its outcome never touches the
response. Copies in flight are bounded proxy-wide (`MirrorSlots`, 64 by default);
a copy past the bound is dropped and counted (`starmesh_mirror_requests_total{result=
"dropped"}`, also `starmesh_mirror_dropped_total`; sent ones as `result="sent"`), and so
is one whose body is still streaming (only complete bodies are copied: copying a
stream would make the request wait for the mirror) or whose version has no endpoint.
Each copy is bounded in time by the route's timeout, else 10 s; its response body is
drained (up to 1 MiB, so the connection can be reused) or closed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable

from starmesh.bundle.spec import Mirror
from starmesh.runtime.filters.balancer import EndpointSource
from starmesh.runtime.filters.upstream import Pool
from starmesh.runtime.message import FixedBody, Filter, Handler, Request, Response
from starmesh.runtime.telemetry import Recorder

__all__ = ["DEFAULT_MIRROR_TIMEOUT_MS", "MIRROR_DRAIN_LIMIT", "MirrorSlots", "mirror_filter"]

DEFAULT_MIRROR_TIMEOUT_MS = 10_000
"""How long a mirror copy may take when the route sets no timeout."""

MIRROR_DRAIN_LIMIT = 1 << 20
"""Bytes of a mirror response read to free its connection; past that it is closed."""


class MirrorSlots:
    """The proxy-wide bound on mirror copies in flight (state that survives applies)."""

    __slots__ = ("limit", "tasks")

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.tasks: set[asyncio.Task[None]] = set()

    def cancel(self) -> None:
        """Cancel every copy in flight (proxy shutdown)."""
        for task in list(self.tasks):
            task.cancel()


async def _drain(response: Response) -> None:
    body = response.body
    if body.complete() is not None:
        return
    read = 0
    while read <= MIRROR_DRAIN_LIMIT:
        chunk = await body.read()
        if not chunk:
            return
        read += len(chunk)
    body.close()


def mirror_filter(
    service: str,
    mirror: Mirror | None,
    timeout_ms: int | None,
    *,
    endpoints: EndpointSource,
    pool: Pool,
    slots: MirrorSlots,
    recorder: Recorder,
    rng: random.Random,
) -> Filter | None:
    """Copy `mirror.percent`% of requests to `mirror.version`; None when nothing is mirrored."""
    if mirror is None or mirror.percent <= 0:
        return None
    version = mirror.version
    percent = float(mirror.percent)
    shadow = f"{service}-shadow"
    seconds = (timeout_ms if timeout_ms is not None else DEFAULT_MIRROR_TIMEOUT_MS) / 1000.0
    draw = rng.random
    tasks = slots.tasks
    send = pool.send
    sent = recorder.count("mirror_sent", service)
    dropped = recorder.count("mirror_dropped", service)

    async def copy_to(endpoint: str, copy: Request) -> None:
        try:
            async with asyncio.timeout(seconds):
                response = await send(endpoint, copy, host=shadow)
                try:
                    await _drain(response)
                except BaseException:
                    response.body.close()
                    raise
        except Exception:  # noqa: BLE001 - a mirror's failure must never reach anyone
            pass

    def launch(request: Request) -> None:
        data = request.body.complete()
        addresses = endpoints.get(service, version)
        if data is None or not addresses or len(tasks) >= slots.limit:
            dropped.n += 1
            return
        headers = [field for field in request.headers if field[0] != "host"]
        headers.append(("host", shadow))
        copy = Request(
            request.method,
            request.path,
            request.query,
            headers,
            FixedBody(data),
            service=service,
            authority=shadow,
            client=request.client,
            source=request.source,
            version=request.version,
            started=request.started,
        )
        copy.target_version = version
        endpoint = addresses[int(draw() * len(addresses))] if len(addresses) > 1 else addresses[0]
        task = asyncio.get_running_loop().create_task(copy_to(endpoint, copy))
        sent.n += 1
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def wrap(inner: Handler) -> Handler:
        def mirrored(request: Request) -> Awaitable[Response]:
            if percent >= 100.0 or draw() * 100.0 < percent:
                launch(request)
            return inner(request)

        return mirrored

    return wrap
