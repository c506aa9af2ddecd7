"""Requests, responses and bodies as the proxy's filter chain sees them.

    listener (runtime/http/server.py) ── Request ──► Handler chain ── Response ──► listener
                                                      (runtime/filters/*, built once per route)
                                                           │
                                                           ▼
                                          upstream pool (runtime/http/client.py)

The listeners parse HTTP/1.1 with httptools and hand the chain a `Request`; the chain
answers with a `Response`, either made by a filter (403, 429, 503 ...) or returned by
the upstream client. Everything here is per request and cheap: plain slotted classes,
header names lower-cased once at parse time, bodies that are either already complete
(the common case, no extra task or copy) or streamed with flow control.

    Handler = Callable[[Request], Awaitable[Response]]
    Filter  = Callable[[Handler], Handler]     # built once per route from validated config
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = [
    "EMPTY",
    "Body",
    "FixedBody",
    "Filter",
    "Handler",
    "Headers",
    "Request",
    "Response",
    "proxy_response",
]

Headers = list[tuple[str, str]]
"""Header fields in order; names lower-cased, values as received (latin-1 decoded)."""


class Body(Protocol):
    """A message body: complete already, or streamed chunk by chunk.

    `length` is the exact size when known (Content-Length), None when it is not
    (chunked). `complete()` returns the whole body when it has fully arrived (no await
    needed: the fast path for small messages), else None. `read()` returns the next
    chunk, b"" at the end; a body is read once, front to back. `close()` releases what
    the body holds (an upstream connection that must not be reused, a paused reader)
    when the body will not be read to the end.
    """

    length: int | None

    def complete(self) -> bytes | None: ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class FixedBody:
    """A body whose bytes are all here."""

    __slots__ = ("_data", "_done", "length")

    def __init__(self, data: bytes = b"") -> None:
        self._data = data
        self._done = False
        self.length: int | None = len(data)

    def complete(self) -> bytes:
        return self._data

    async def read(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self._data

    def close(self) -> None:
        self._done = True


EMPTY = FixedBody(b"")
"""The empty body. FixedBody(b"").read() is idempotent enough to share: it returns b"" at the end."""


class Request:
    """One HTTP request on its way through the chain.

    `service` is the destination service (outbound: from Host or the absolute-form
    URL; inbound: the local service). `source` is the caller's identity proven by mTLS
    (inbound only), never taken from a header. `deadline` is the loop time by which the
    whole request must be answered (set by the timeout filter), None = unbounded.
    `target_version` is the version the weighted split picked for this request (set
    once, before retries; None = any endpoint of the service). `attempt` counts tries.

    Every argument can be passed by position: the reader does (one call per request,
    and keyword arguments to `__init__` cost it about 0.25 µs); elsewhere, name them.
    """

    __slots__ = (
        "method",
        "path",
        "query",
        "headers",
        "body",
        "service",
        "authority",
        "client",
        "source",
        "version",
        "keep_alive",
        "upgrade",
        "started",
        "deadline",
        "attempt",
        "target_version",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str | None,
        headers: Headers,
        body: Body,
        service: str = "",
        authority: str = "",
        client: str = "",
        source: str | None = None,
        version: str = "1.1",
        keep_alive: bool = True,
        upgrade: bool = False,
        started: float = 0.0,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.service = service
        self.authority = authority
        self.client = client
        self.source = source
        self.version = version
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.started = started
        self.deadline: float | None = None
        self.attempt = 0
        self.target_version: str | None = None

    @property
    def target(self) -> str:
        """The origin-form request target: path plus `?query` when there is one."""
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def header(self, name: str) -> str | None:
        """The first value of a header (`name` lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Response:
    """One HTTP response on its way back.

    `error` is the `x-starmesh-error` reason when the proxy made this response itself
    (DESIGN.md: no-route, timeout, overflow, rate-limited, denied, fault,
    no-healthy-upstream, upstream-unavailable, upstream-reset, not-ready), "" when it
    came from upstream. `endpoint` is the upstream "host:port" that answered, if any.
    `tunnel` is set for a 101 Switching Protocols answer: an object the listener uses
    to splice the two connections (see runtime/http/tunnel.py).
    """

    __slots__ = ("status", "headers", "body", "error", "endpoint", "version", "tunnel")

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: Body = EMPTY,
        *,
        error: str = "",
        endpoint: str = "",
        version: str = "",
        tunnel: object | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.error = error
        self.endpoint = endpoint
        self.version = version
        self.tunnel = tunnel


def proxy_response(status: int, reason: str, message: str = "", extra: Headers | None = None) -> Response:
    """A response the proxy makes itself, tagged `x-starmesh-error: <reason>`.

    The body is one line of text saying what happened, so a person with curl sees why.
    """
    text = f"{reason}: {message}\n" if message else f"{reason}\n"
    data = text.encode()
    headers: Headers = [
        ("x-starmesh-error", reason),
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(data))),
    ]
    if extra:
        headers.extend(extra)
    return Response(status, headers, FixedBody(data), error=reason)


Handler = Callable[[Request], Awaitable[Response]]
Filter = Callable[[Handler], Handler]
