"""Load balancing over the chosen version's endpoints, with outlier detection.

The last filter of the calling side: it picks one endpoint of `request.target_version`
(every version's when None) from the live endpoint table and calls `send`.

- `round_robin`: in turn, per route;
- `least_request`: power of two choices, the one with fewer requests in flight
  (`pool.active`);
- `random`: uniformly.

No endpoint (or all ejected) is 503 `no-healthy-upstream`. With outlier detection,
each answer feeds the service's `OutlierState` (see outlier.py): a 5xx response or an
UpstreamError counts as a failure, anything else resets the run.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

from starmesh.bundle.spec import LoadBalancer
from starmesh.runtime.filters.outlier import OutlierState
from starmesh.runtime.filters.upstream import Pool, Send, UpstreamError
from starmesh.runtime.message import Handler, Request, Response, proxy_response

__all__ = ["EndpointSource", "balancer"]


class EndpointSource(Protocol):
    """The live endpoint table (runtime/endpoints.py's `Endpoints`)."""

    def get(self, service: str, version: str | None) -> tuple[str, ...]:
        """`("host:port", ...)` of one version of `service`; None = every version's."""
        ...


async def _answer(response: Response) -> Response:
    return response


def _picker(algorithm: LoadBalancer, pool: Pool, rng: random.Random) -> Callable[[tuple[str, ...]], str]:
    if algorithm == "round_robin":
        turn = itertools.count()

        def round_robin(endpoints: tuple[str, ...]) -> str:
            return endpoints[next(turn) % len(endpoints)]

        return round_robin
    draw = rng.random
    if algorithm == "random":

        def uniform(endpoints: tuple[str, ...]) -> str:
            return endpoints[int(draw() * len(endpoints))]

        return uniform
    if algorithm == "least_request":
        active = pool.active

        def least_request(endpoints: tuple[str, ...]) -> str:
            n = len(endpoints)
            if n == 1:
                return endpoints[0]
            a = int(draw() * n)
            b = int(draw() * (n - 1))
            if b >= a:
                b += 1
            first, second = endpoints[a], endpoints[b]
            return second if active(second) < active(first) else first

        return least_request
    raise ValueError(f"unknown load_balancer {algorithm!r}: use round_robin, least_request or random")


def balancer(
    service: str,
    algorithm: LoadBalancer,
    *,
    endpoints: EndpointSource,
    pool: Pool,
    send: Send,
    outliers: OutlierState | None,
    clock: Callable[[], float],
    rng: random.Random,
) -> Handler:
    """The terminal handler for one route of `service`."""
    get = endpoints.get
    pick = _picker(algorithm, pool, rng)

    def no_endpoint(request: Request, ejected: bool) -> Awaitable[Response]:
        version = request.target_version
        which = f"version {version!r} of {service!r}" if version is not None else f"service {service!r}"
        why = "every endpoint is ejected by outlier detection" if ejected else "it has no endpoints"
        return _answer(proxy_response(503, "no-healthy-upstream", f"{which}: {why}"))

    if outliers is None:

        def balance(request: Request) -> Awaitable[Response]:
            candidates = get(service, request.target_version)
            if not candidates:
                return no_endpoint(request, False)
            return send(pick(candidates), request)

        return balance

    state = outliers

    async def observed(endpoint: str, candidates: tuple[str, ...], request: Request) -> Response:
        try:
            response = await send(endpoint, request)
        except UpstreamError:
            state.failure(endpoint, candidates, clock())
            raise
        if response.status >= 500:
            state.failure(endpoint, candidates, clock())
        elif state.failures:  # a run to end (success() is a no-op otherwise)
            state.success(endpoint)
        return response

    def balance_observed(request: Request) -> Awaitable[Response]:
        candidates = get(service, request.target_version)
        admitted = state.admitted(candidates, clock()) if state.ejected else candidates
        if not admitted:
            return no_endpoint(request, bool(candidates))
        return observed(pick(admitted), candidates, request)

    return balance_observed
