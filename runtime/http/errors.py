"""The HTTP layer's exceptions.

    ProxyError (starmesh.runtime.errors)
     └── HttpError              anything the HTTP layer cannot do
          ├── UpstreamError     an upstream call failed: "upstream-unavailable" | "upstream-reset"
          └── RequestBodyError  the client's request body is invalid, too large or cut off

Socket errors (OSError, ConnectionError, TimeoutError on connect) are mapped to
UpstreamError where the pool catches them, and re-raised `from exc`.
"""

from __future__ import annotations

from typing import Literal

from starmesh.runtime.errors import ProxyError

__all__ = ["HttpError", "RequestBodyError", "UpstreamError", "UpstreamReason"]

UpstreamReason = Literal["upstream-unavailable", "upstream-reset"]


class HttpError(ProxyError):
    """Root of the HTTP layer's exceptions."""


class UpstreamError(HttpError):
    """An upstream call failed before a complete response head arrived (or mid-body).

    `reason` is the `x-starmesh-error` word the proxy answers with: "upstream-unavailable"
    when connecting failed (refused, unreachable, connect timeout), "upstream-reset" when
    the upstream reset or closed the connection before a complete response. `sent` says
    whether any byte of the request may have reached the upstream: a non-idempotent
    request is retried only when it is False.
    """

    def __init__(self, reason: UpstreamReason, message: str = "", *, sent: bool) -> None:
        super().__init__(message or reason)
        self.reason: UpstreamReason = reason
        self.sent = sent


class RequestBodyError(HttpError):
    """The client's request body cannot be read: too large (413), malformed or cut off (400).

    Raised from `Body.read()` of a streamed request body; the listener answers `status`
    with the message (if it has not started the response yet) and closes the connection.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
