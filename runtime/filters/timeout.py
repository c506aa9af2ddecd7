"""The request timeout: one deadline over the whole request, retries included.

Sets `request.deadline` (loop time) so inner filters can bound their waits (retry
backoff, the breaker's pending queue); keeps an earlier deadline already set (a fault
delay starts it). When the deadline passes, the inner work is cancelled (the task is
cancelled at its current await, as `asyncio.timeout` does, through a shared
`DeadlineQueue` that costs far less per request) and the caller gets 504 `timeout`.
The deadline covers the response head; a streamed body after it is the listener's
concern.
"""

from __future__ import annotations

import asyncio

from starmesh.runtime.filters.deadline import DeadlineQueue, running
from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response

__all__ = ["timeout_filter"]


def timeout_filter(timeout_ms: int | None) -> Filter | None:
    """Bound requests by `timeout_ms`; None when the route has no timeout."""
    if timeout_ms is None:
        return None
    seconds = timeout_ms / 1000.0
    what = f"no response within the route's timeout ({timeout_ms} ms, retries included)"
    deadlines = DeadlineQueue()

    def timed_out() -> Response:
        return proxy_response(504, "timeout", what)

    def wrap(inner: Handler) -> Handler:
        async def timeout(request: Request) -> Response:
            loop, task = running()
            deadline = loop.time() + seconds
            if request.deadline is not None and request.deadline < deadline:
                deadline = request.deadline
            request.deadline = deadline
            expiry = deadlines.start(loop, deadline, task)
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
