"""Telemetry: count and time every request, outermost in both chains.

The duration runs to the response head (when the chain returns the Response), which is
what the chain can see without wrapping the body. `reason` is the response's
`x-starmesh-error` word when the proxy made it, "" otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from starmesh.runtime.message import Filter, Handler, Request, Response
from starmesh.runtime.telemetry import Recorder, RouteRecord

__all__ = ["telemetry_filter"]


def telemetry_filter(
    recorder: Recorder,
    clock: Callable[[], float],
    *,
    direction: str,
    source: str | None,
    destination: str,
    version: str | None,
) -> Filter:
    """Record each request under fixed labels.

    `source` None takes the request's proven identity (inbound); `version` None takes
    the version the split picked, `request.target_version` (outbound)."""
    record = recorder.request
    if source is not None:
        return _fixed_source(recorder.bind(direction, source, destination), clock, version)

    # The source varies per request (inbound: the caller's proven identity).
    def wrap(inner: Handler) -> Handler:
        async def telemetry(request: Request) -> Response:
            start = clock()
            try:
                response = await inner(request)
            except Exception:
                picked = (request.target_version or "") if version is None else version  # set by the split, inside
                record(direction, request.source or "", destination, picked, 500, "", clock() - start)
                raise
            picked = (request.target_version or "") if version is None else version
            record(direction, request.source or "", destination, picked, response.status, response.error, clock() - start)
            return response

        return telemetry

    return wrap


def _fixed_source(record: RouteRecord, clock: Callable[[], float], version: str | None) -> Filter:
    """The telemetry filter when the source is fixed (outbound): a per-route bound recorder."""

    def wrap(inner: Handler) -> Handler:
        async def telemetry(request: Request) -> Response:
            start = clock()
            try:
                response = await inner(request)
            except Exception:
                record((request.target_version or "") if version is None else version, 500, "", clock() - start)
                raise
            record(
                (request.target_version or "") if version is None else version,
                response.status,
                response.error,
                clock() - start,
            )
            return response

        return telemetry

    return wrap
