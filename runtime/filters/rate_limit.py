"""Local rate limit on the receiving side: a token bucket per service.

The bucket holds `burst` tokens and starts full; it refills at `requests_per_second`.
Each request takes one token; an empty bucket answers 429 `rate-limited` with
`Retry-After` in whole seconds (at least 1): when the next token will be there. The
StateRegistry keeps the bucket across applies while the config is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from starmesh.bundle.spec import RateLimit
from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response
from starmesh.runtime.telemetry import Count

__all__ = ["TokenBucket", "rate_limit_filter"]


class TokenBucket:
    """`tokens` out of `burst`, refilled lazily from the clock on each take."""

    __slots__ = ("config", "rate", "burst", "tokens", "stamp")

    def __init__(self, config: RateLimit, now: float) -> None:
        self.config = config
        self.rate = float(config.requests_per_second)
        self.burst = float(config.burst)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when taken, else the seconds until one is there."""
        tokens = self.tokens
        if tokens < self.burst and now > self.stamp:
            tokens = min(self.burst, tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        if self.rate <= 0.0:
            return math.inf
        return (1.0 - tokens) / self.rate


async def _answer(response: Response) -> Response:
    return response


def rate_limit_filter(
    service: str, bucket: TokenBucket, clock: Callable[[], float], limited_count: Count | None = None
) -> Filter:
    """Take a token of `bucket` per request; 429 when there is none (counted in `limited_count`)."""
    take = bucket.take
    counted = limited_count or Count()

    def limited(wait: float) -> Response:
        counted.n += 1
        seconds = 3600 if math.isinf(wait) else max(1, math.ceil(wait))
        return proxy_response(
            429,
            "rate-limited",
            f"{service} accepts {bucket.config.requests_per_second} requests/s (burst {bucket.config.burst})",
            [("retry-after", str(seconds))],
        )

    def wrap(inner: Handler) -> Handler:
        def rate_limit(request: Request) -> Awaitable[Response]:
            wait = take(clock())
            if wait:
                return _answer(limited(wait))
            return inner(request)

        return rate_limit

    return wrap
