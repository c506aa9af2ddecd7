"""Weighted version pick: once per request, before any retry.

`rule.pick(roll)` with a roll in [0, 100) chooses among the rule's weighted backends;
the pick lands in `request.target_version`, which the load balancer, telemetry and
retries read. A rule without backends (all endpoints) has no split filter.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable

from starmesh.bundle.routes import PreparedRule
from starmesh.runtime.message import Filter, Handler, Request, Response

__all__ = ["split_filter"]


def split_filter(rule: PreparedRule, rng: random.Random) -> Filter | None:
    """The version pick for `rule`; None when the rule sends to every endpoint."""
    if not rule.backends:
        return None
    pick = rule.pick
    draw = rng.random
    only = rule.backends[0] if len(rule.backends) == 1 else None

    def wrap(inner: Handler) -> Handler:
        # Plain functions returning the inner awaitable: no coroutine layer of their own.
        if only is not None:

            def fixed(request: Request) -> Awaitable[Response]:
                request.target_version = only
                return inner(request)

            return fixed

        def split(request: Request) -> Awaitable[Response]:
            request.target_version = pick(draw() * 100.0)
            return inner(request)

        return split

    return wrap
