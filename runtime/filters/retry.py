"""Retries: more tries after a retryable failure, within a budget and the deadline.

What is retryable (`on`, read once per route; DESIGN.md "Hops"):
- `5xx`: any 5xx response from upstream; also, as in Envoy, an UpstreamError and a try
  cut off by `per_try_timeout` (a gateway failure);
- `connect-failure`: UpstreamError `upstream-unavailable`, or a peer proxy's 5xx with
  `x-starmesh-error: upstream-unavailable`;
- `reset`: UpstreamError `upstream-reset`, or a peer's `x-starmesh-error: upstream-reset`.
Responses this proxy made itself further in (`overflow`, `no-healthy-upstream`) are
local verdicts and are not retried.

Limits on every retry:
- Idempotence: a request whose method is not idempotent (RFC 9110: anything but GET,
  HEAD, OPTIONS, TRACE, PUT, DELETE) is retried only after an UpstreamError with
  `sent` False: it never reached the upstream.
- Body: the request body must be replayable (complete, or streamed within
  `REPLAY_LIMIT`, see replay.py).
- Budget (per service, `RetryBudget`): requests retrying stay at or below
  max(3, budget_percent% of the requests in flight through the service's retry
  filters); a request counts as retrying from its first retry until it ends, and a
  request the budget turns away gets its last outcome.
- Backoff: exponential with full jitter, uniform in [0, min(250 ms, 25 ms × 2^n)); a
  retry that could not start before the deadline is not made.
- `per_try_timeout` bounds one try (only when it ends before the deadline; otherwise
  the timeout filter's deadline is what cuts the try); the try is cancelled at its
  current await (see deadline.py).

When tries run out (or a limit stops them) the caller gets the last try's outcome: the
upstream response as it was (a 5xx passed through), 503 with the UpstreamError's
reason (`upstream-unavailable`, or `upstream-reset` when the last failure was a
reset, so a caller's `reset` condition still reads it), or 504 `timeout` when the last
try was cut off by `per_try_timeout`. Bodies of responses retried past are closed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from starmesh.bundle.spec import Retries
from starmesh.runtime.filters.circuit_breaker import BreakerState
from starmesh.runtime.filters.deadline import DeadlineQueue, Expiry, running
from starmesh.runtime.filters.replay import Recording
from starmesh.runtime.filters.timeout import RouteTimeout
from starmesh.runtime.filters.upstream import UpstreamError, upstream_error_response
from starmesh.runtime.message import FixedBody, Filter, Handler, Request, Response, proxy_response
from starmesh.runtime.telemetry import Count

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "IDEMPOTENT_METHODS",
    "MIN_RETRIES_IN_FLIGHT",
    "RetryBudget",
    "backoff",
    "retry_filter",
]

BACKOFF_BASE = 0.025
"""Seconds: the first retry's backoff ceiling."""

BACKOFF_CAP = 0.25
"""Seconds: no backoff ceiling grows past this."""

MIN_RETRIES_IN_FLIGHT = 3
"""The budget always allows this many concurrent retries."""

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 9.2.2; other methods are retried only when the request was never sent."""

Sleep = Callable[[float], Awaitable[None]]


class RetryBudget:
    """One service's requests in flight through retry filters, and how many are retrying."""

    __slots__ = ("active", "retrying")

    def __init__(self) -> None:
        self.active = 0
        self.retrying = 0

    def allows(self, percent: float) -> bool:
        """Whether one more request may start retrying."""
        return self.retrying < max(MIN_RETRIES_IN_FLIGHT, self.active * percent / 100.0)


def backoff(retry: int, roll: float) -> float:
    """The wait before retry number `retry` (0-based) for a roll in [0, 1): full jitter."""
    return roll * min(BACKOFF_CAP, BACKOFF_BASE * (1 << min(retry, 16)))


def _peer_error(response: Response) -> str:
    for name, value in response.headers:
        if name == "x-starmesh-error":
            return value
    return ""


def retry_filter(
    policy: Retries | None,
    budget: RetryBudget,
    *,
    rng: random.Random,
    sleep: Sleep,
    timeout: RouteTimeout | None = None,
    breaker: BreakerState | None = None,
    retry_count: Count | None = None,
    timeout_count: Count | None = None,
    overflow_count: Count | None = None,
) -> Filter | None:
    """Retry per `policy`; None when the route makes no retries.

    With `timeout` the filter also is the route's timeout (timeout.py's behaviour,
    outside the tries), and with `breaker` it holds a breaker slot around each try
    (circuit_breaker.py's behaviour): one coroutine layer per request instead of three.
    The counts: each retry made, each try cut off by `per_try_timeout`, each try the
    breaker turned away (the destination service's cells in the recorder)."""
    if policy is None or policy.attempts <= 0:
        return None
    retried = retry_count or Count()
    timed_out_tries = timeout_count or Count()
    overflowed = overflow_count or Count()
    start_timeout = timeout.start if timeout is not None else None
    timed_out = timeout.timed_out if timeout is not None else None
    attempts = policy.attempts
    on_5xx = "5xx" in policy.on
    on_connect = "connect-failure" in policy.on
    on_reset = "reset" in policy.on
    percent = float(policy.budget_percent)
    per_try = policy.per_try_timeout_ms / 1000.0 if policy.per_try_timeout_ms is not None else None
    draw = rng.random
    per_try_deadlines = DeadlineQueue()

    def retryable_response(response: Response) -> bool:
        if response.status < 500 or response.error:
            return False
        if on_5xx:
            return True
        peer = _peer_error(response)
        return (on_connect and peer == "upstream-unavailable") or (on_reset and peer == "upstream-reset")

    def retryable_error(exc: UpstreamError) -> bool:
        if on_5xx:
            return True
        return on_connect if exc.reason == "upstream-unavailable" else on_reset

    def wrap(inner: Handler) -> Handler:
        async def retry(request: Request) -> Response:
            loop, task = running()
            # The route's timeout, when this filter runs it (see retry_filter).
            overall = start_timeout(loop, task, request) if start_timeout is not None else None
            try:
                data = request.body.complete()
                recording: Recording | None = None
                if data is None:
                    recording = Recording(request.body)
                    request.body = recording.body()
                budget.active += 1
                retrying = False
                tries = 0
                try:
                    while True:
                        request.attempt = tries
                        response: Response | None = None
                        error: UpstreamError | None = None
                        # One try, bounded by per_try_timeout when that ends before the
                        # request's deadline (inline, not a coroutine of its own).
                        expiry: Expiry | None = None
                        if per_try is not None:
                            ends = loop.time() + per_try
                            deadline = request.deadline
                            if deadline is None or ends < deadline:
                                expiry = per_try_deadlines.start(loop, ends, task)
                        try:
                            if breaker is None:
                                response = await inner(request)
                            else:  # the circuit breaker's layer, inline: a slot per try
                                admitted = breaker.admit()
                                if admitted is False:
                                    overflowed.n += 1
                                    response = breaker.overflow()
                                else:
                                    if admitted is None:
                                        await breaker.wait()
                                    try:
                                        response = await inner(request)
                                    finally:
                                        breaker.release()
                        except UpstreamError as exc:
                            error = exc
                            again = retryable_error(exc) and (not exc.sent or request.method in IDEMPOTENT_METHODS)
                        except asyncio.CancelledError:
                            if expiry is None or not expiry.expired():
                                raise
                            timed_out_tries.n += 1
                            again = on_5xx and request.method in IDEMPOTENT_METHODS  # cut off by per_try_timeout
                        else:
                            # The inner code swallowed the cancellation (`fired` first: expired()
                            # is only worth a call once the timer fired).
                            if expiry is not None and expiry.fired and expiry.expired():
                                response.body.close()
                                response = None
                                timed_out_tries.n += 1
                                again = on_5xx and request.method in IDEMPOTENT_METHODS
                            else:
                                again = (
                                    response.status >= 500
                                    and retryable_response(response)
                                    and request.method in IDEMPOTENT_METHODS
                                )
                        finally:
                            if expiry is not None:
                                expiry.finish()
                        if (
                            not again
                            or tries >= attempts
                            or (recording is not None and not recording.replayable)
                            or (not retrying and not budget.allows(percent))
                        ):
                            break
                        wait = backoff(tries, draw())
                        deadline = request.deadline
                        if deadline is not None and loop.time() + wait >= deadline:
                            break
                        if not retrying:
                            retrying = True
                            budget.retrying += 1
                        if response is not None:
                            response.body.close()
                        if wait > 0.0:
                            await sleep(wait)
                        tries += 1
                        retried.n += 1
                        request.body = recording.body() if recording is not None else FixedBody(data or b"")
                finally:
                    budget.active -= 1
                    if retrying:
                        budget.retrying -= 1
                if response is not None:
                    result = response
                elif error is not None:
                    result = upstream_error_response(error, f"after {tries + 1} tries")
                else:
                    result = proxy_response(
                        504, "timeout", f"no response within per_try_timeout ({policy.per_try_timeout_ms} ms)"
                    )
            except asyncio.CancelledError:
                if overall is not None and timed_out is not None and overall.expired():
                    return timed_out()
                raise
            finally:
                if overall is not None:
                    overall.finish()
            if overall is not None and timed_out is not None and overall.fired and overall.expired():
                result.body.close()  # the inner code swallowed the timeout's cancellation
                return timed_out()
            return result

        return retry

    return wrap
