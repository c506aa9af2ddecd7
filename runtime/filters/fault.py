"""Fault injection: delay first, then abort, each drawn independently per request.

Both draws happen on entry with the rule's percents. A delayed request sleeps, then is
aborted or passed on. The route's timeout bounds the delay too (DESIGN.md: timeouts
bound the whole request): when the rule has a timeout, the fault filter starts the
request's deadline before sleeping (the timeout filter further in keeps that
deadline), and a delay that would run past it ends at the deadline with 504 `timeout`.
An abort answers with the configured status and reason `fault`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from starmesh.bundle.spec import Fault
from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response

__all__ = ["fault_filter"]

Sleep = Callable[[float], Awaitable[None]]


async def _answer(response: Response) -> Response:
    return response


def fault_filter(fault: Fault | None, timeout_ms: int | None, rng: random.Random, sleep: Sleep) -> Filter | None:
    """Inject `fault`; None when it can neither delay nor abort anything."""
    if fault is None:
        return None
    delay = fault.delay_ms / 1000.0 if fault.delay_ms and fault.delay_percent > 0 else None
    abort = fault.abort_status if fault.abort_status is not None and fault.abort_percent > 0 else None
    if delay is None and abort is None:
        return None
    delay_percent = float(fault.delay_percent)
    abort_percent = float(fault.abort_percent)
    timeout = timeout_ms / 1000.0 if timeout_ms is not None else None
    draw = rng.random

    def aborted() -> Response:
        return proxy_response(abort or 500, "fault", f"injected abort ({abort_percent:g}% of requests)")

    def wrap(inner: Handler) -> Handler:
        async def delayed(request: Request, abort_it: bool) -> Response:
            assert delay is not None
            now = asyncio.get_running_loop().time()
            if timeout is not None and (request.deadline is None or now + timeout < request.deadline):
                request.deadline = now + timeout
            deadline = request.deadline
            if deadline is not None and now + delay >= deadline:
                await sleep(max(0.0, deadline - now))
                return proxy_response(504, "timeout", "the request's timeout ran out during an injected delay")
            await sleep(delay)
            if abort_it:
                return aborted()
            return await inner(request)

        def inject(request: Request) -> Awaitable[Response]:
            delay_it = delay is not None and draw() * 100.0 < delay_percent
            abort_it = abort is not None and draw() * 100.0 < abort_percent
            if delay_it:
                return delayed(request, abort_it)
            if abort_it:
                return _answer(aborted())
            return inner(request)

        return inject

    return wrap
