"""The request timeout: one deadline over the whole request, retries included.

Sets `request.deadline` (loop time) so inner filters can bound their waits (retry
backoff, the breaker's pending queue); keeps an earlier deadline already set (a fault
delay starts it). When the deadline passes, the inner work is cancelled (the task is
cancelled at its current await, as `asyncio.timeout` does, through a shared
`DeadlineQueue` that costs far less per request) and the caller gets 504 `timeout`.
The deadline covers the response head; a streamed body after it is the listener's
concern.

When the route also retries, the retry filter runs this deadline itself through a
`RouteTimeout` (its coroutine is the timeout's): one coroutine layer fewer per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starmesh.runtime.filters.deadline import DeadlineQueue, Expiry, running
from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response
from starmesh.runtime.telemetry import Count

__all__ = ["RouteTimeout", "timeout_filter"]


class RouteTimeout:
    """One route's timeout: starts a request's deadline and makes the 504 `timeout` answer
    (counted in `timeouts`, the destination service's `starmesh_timeouts_total`)."""

    __slots__ = ("seconds", "what", "_deadlines", "_timeouts")

    def __init__(self, timeout_ms: int, timeouts: Count | None = None) -> None:
        self.seconds = timeout_ms / 1000.0
        self.what = f"no response within the route's timeout ({timeout_ms} ms, retries included)"
        self._deadlines = DeadlineQueue()
        self._timeouts = timeouts or Count()

    def start(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], request: Request) -> Expiry:
        """Set `request.deadline` (an earlier one already set stays) and arm it."""
        deadline = loop.time() + self.seconds
        if request.deadline is not None and request.deadline < deadline:
            deadline = request.deadline
        request.deadline = deadline
        return self._deadlines.start(loop, deadline, task)

    def timed_out(self) -> Response:
        """The caller's answer when the deadline passed (once per request that timed out)."""
        self._timeouts.n += 1
        return proxy_response(504, "timeout", self.what)


def timeout_filter(timeout_ms: int | None, timeouts: Count | None = None) -> Filter | None:
    """Bound requests by `timeout_ms`, counting timeouts in `timeouts`; None when the route has no timeout."""
    if timeout_ms is None:
        return None
    route_timeout = RouteTimeout(timeout_ms, timeouts)
    start = route_timeout.start
    timed_out = route_timeout.timed_out

    def wrap(inner: Handler) -> Handler:
        async def timeout(request: Request) -> Response:
            loop, task = running()
            expiry = start(loop, task, request)
            try:
                response = await inner(request)
            except asyncio.CancelledError:
                if expiry.expired():
                    return timed_out()
                raise
            finally:
                expiry.finish()
            if expiry.fired and expiry.expired():  # the inner code swallowed the cancellation
                response.body.close()
                return timed_out()
            return response

        return timeout

    return wrap
