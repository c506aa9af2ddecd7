"""Circuit breaker: cap the requests in flight to a service, and the requests waiting.

Per service, shared by every route and surviving applies (the StateRegistry keeps one
`BreakerState`; an apply only changes its limits). Up to
`min(max_connections, max_requests)` requests are in flight at once (each try of a
retried request counts). Past that, up to `max_pending_requests` wait in FIFO order
for a slot, at most until the request's deadline (the timeout filter cancels the
wait); anything more is answered at once with 503 `overflow`. A freed slot goes
straight to the first waiter. A request holds its slot until its response head
arrives.

A service without `circuit_breaker` gets the builtin defaults (1024 / 1024 / 1024):
generous, but never an unbounded queue.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starmesh.bundle.spec import CircuitBreaker
from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response
from starmesh.runtime.telemetry import Count

__all__ = ["DEFAULT_BREAKER", "BreakerState", "circuit_breaker_filter"]

DEFAULT_BREAKER = CircuitBreaker()
"""The limits for a service that configures none (the builtin's defaults)."""


class BreakerState:
    """One service's slots in flight and its bounded FIFO of waiters."""

    __slots__ = ("service", "limit", "max_pending", "active", "waiters")

    def __init__(self, service: str, config: CircuitBreaker) -> None:
        self.service = service
        self.limit = 0
        self.max_pending = 0
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.configure(config)

    def configure(self, config: CircuitBreaker) -> None:
        """Take new limits (an apply); waiters that now fit are let in."""
        self.limit = min(config.max_connections, config.max_requests)
        self.max_pending = config.max_pending_requests
        while self.waiters and self.active < self.limit:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    def admit(self) -> bool | None:
        """Take a slot if one is free (True); None: there is room to `wait`; False: overflow."""
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return True
        return None if len(self.waiters) < self.max_pending else False

    def overflow(self) -> Response:
        """The 503 `overflow` answer when the pending queue is full too."""
        return proxy_response(
            503,
            "overflow",
            f"circuit breaker of {self.service!r}: {self.active} requests in flight "
            f"and {len(self.waiters)} waiting (the limits)",
        )

    def release(self) -> None:
        """A request leaves: hand its slot to the first live waiter, or free it."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    async def wait(self) -> None:
        """Queue for a slot (the caller checked the queue has room); cancellation-safe."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we were cancelled: pass it on
            else:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            raise


def circuit_breaker_filter(state: BreakerState, overflows: Count | None = None) -> Filter:
    """Hold a slot of `state` around the inner call; each 503 `overflow` is counted in `overflows`.

    (A route with retries has no such layer: the retry filter holds the slot around
    each try itself, through `admit`/`wait`/`release`.)"""

    overflow = state.overflow
    overflowed = overflows or Count()

    def wrap(inner: Handler) -> Handler:
        async def breaker(request: Request) -> Response:
            if state.active < state.limit and not state.waiters:
                state.active += 1
            elif len(state.waiters) < state.max_pending:
                await state.wait()
            else:
                overflowed.n += 1
                return overflow()
            try:
                return await inner(request)
            finally:
                if state.waiters:
                    state.release()
                else:  # release() without waiters, inlined: free the slot
                    state.active -= 1

        return breaker

    return wrap
