"""The end of every chain: hand the request to the upstream pool.

    Pool.send(endpoint, request)  ->  Response            (runtime/http/client.py)
                                  or  UpstreamError(reason, sent)

On the calling side the load balancer picks the endpoint and calls a `Send`. When the
route retries, `Send` is the pool's own `send`: the retry filter needs the
UpstreamError (was the request sent? reset or refused?) and maps it itself once tries
run out. Without retries, `mapped_send` answers the error at once: 503
`upstream-unavailable` (connect failed) or 503 `upstream-reset` (the upstream reset or
closed before a complete response). The receiving side's `app_handler` does the same
for the local app (DESIGN.md "Hops").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from starmesh.runtime.http.errors import UpstreamError
from starmesh.runtime.message import Handler, Request, Response, proxy_response

__all__ = ["Pool", "Send", "UpstreamError", "app_handler", "mapped_send", "upstream_error_response"]

Send = Callable[[str, Request], Awaitable[Response]]
"""Send a request to one endpoint ("host:port")."""


class Pool(Protocol):
    """The upstream client the chain calls (runtime/http/client.py's UpstreamPool)."""

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        """Send `request` to `endpoint`; `host` replaces the Host header. Raises UpstreamError."""
        ...

    def active(self, endpoint: str) -> int:
        """Requests in flight to `endpoint` (least-request balancing reads it)."""
        ...


def upstream_error_response(exc: UpstreamError, where: str) -> Response:
    """The proxy's answer for a failed upstream call: 503 with the error's reason.

    `where` says which call failed (the endpoint, or how many tries were made)."""
    return proxy_response(503, exc.reason, f"{where}: {exc}")


def mapped_send(pool: Pool) -> Send:
    """`pool.send` with UpstreamError answered as a 503 (routes without retries)."""
    send = pool.send

    async def send_mapped(endpoint: str, request: Request) -> Response:
        try:
            return await send(endpoint, request)
        except UpstreamError as exc:
            return upstream_error_response(exc, endpoint)

    return send_mapped


def app_handler(pool: Pool, app: str) -> Handler:
    """The receiving side's last step: forward to the local app at `app` ("host:port")."""
    send = pool.send

    async def to_app(request: Request) -> Response:
        try:
            return await send(app, request)
        except UpstreamError as exc:
            return upstream_error_response(exc, app)

    return to_app
