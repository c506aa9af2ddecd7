"""One upstream connection: one HTTP/1.1 exchange at a time (runtime/http/client.py pools them).

    exchange(request) ─► head (+ complete body) in one write, or head then a streamed body
                      ◄─ response head ─► Response: FixedBody when the body came with it,
                                           else a StreamBody this connection feeds
    end of the body ─► owner.release(conn) (keep-alive) or close

Responses are parsed with httptools; hop-by-hop fields are dropped and the fields are
decoded as httptools reports them. 1xx interim answers are skipped; a 101
turns the connection into the upstream half of a Tunnel. A connection found closed before
any byte of the answer, after it had been reused, raises `Stale` so the pool may retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol, cast

import httptools

from starmesh.runtime.http.body import StreamBody
from starmesh.runtime.http.errors import RequestBodyError, UpstreamError
from starmesh.runtime.http.headers import HOP_BY_HOP, NOT_FORWARDED, remove_named
from starmesh.runtime.http.tunnel import Tunnel
from starmesh.runtime.http.wire import LAST_CHUNK, chunk_prefix
from starmesh.runtime.message import EMPTY, Body, FixedBody, Headers, Request, Response

__all__ = ["ConnectionOwner", "Stale", "UpstreamConnection", "request_head"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods that announce `content-length: 0` for an empty body."""

_CONNECTION_KEYWORDS = frozenset({"close", "keep-alive", "upgrade"})
_FORWARDED: dict[bytes, str] = {}
"""Raw field name -> lower-case name, for the names seen so far that are not hop-by-hop."""
_FORWARDED_MAX = 2048
_HOP_NAMES: dict[bytes, str] = {}
"""Raw field name -> lower-case name, for the hop-by-hop names seen so far."""
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"})
"""Common Connection values that name no other field (the usual answer's only one)."""
_LARGE_WRITE = 64 * 1024


class Stale(Exception):
    """A reused connection closed before anything of the response arrived."""


class ConnectionOwner(Protocol):
    """The pool a connection reports to."""

    def opened(self, conn: UpstreamConnection) -> None:
        """The connection is up."""

    def lost(self, conn: UpstreamConnection) -> None:
        """The connection closed (or became a tunnel): forget it."""

    def release(self, conn: UpstreamConnection) -> None:
        """The exchange ended cleanly: keep the connection for reuse (or close it)."""

    def ended(self, endpoint: str) -> None:
        """A streamed response body ended: one request less in flight to `endpoint`."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream endpoint: one exchange at a time."""

    def __init__(self, pool: ConnectionOwner, endpoint: str, loop: asyncio.AbstractEventLoop) -> None:
        # 29 instance attributes: a 30th measured ~0.15 us slower per exchange (CPython
        # 3.11 limits the size of its shared-keys instance layout); mind it before adding one.
        self.endpoint = endpoint
        self.usable = False
        self.owes_active = False
        self.lost: asyncio.Future[None] = loop.create_future()
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._closed = False
        self._reused = False
        self.generation = 0
        self._write_paused = False
        self._read_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # the exchange in progress
        self._waiter: asyncio.Future[Response] | None = None
        self._stream: StreamBody | None = None
        self._received = False
        self._version = ""
        self._request_sent = False
        self._head_request = False
        self._head_done = False
        self._status = 0
        self._headers: Headers = []
        self._hop: list[tuple[str, bytes]] | None = None
        self._chunked = False
        self._keep_alive = False
        self._close_delimited = False
        self._length: int | None = None
        self._parts: list[bytes] | None = None

    # -- the exchange ----------------------------------------------------------------

    def exchange(self, request: Request, authority: str) -> Awaitable[Response]:
        """Start sending `request`; the awaitable gives the response once its head arrived.

        A complete body is written at once with the head and the awaitable is the bare
        response future (no coroutine per request); a streamed body needs a coroutine.
        """
        self._received = False
        self._request_sent = False
        self._head_done = False
        self._head_request = request.method == "HEAD"
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        body = request.body
        data = body.complete()
        if data is None:
            return self._exchange_streaming(request, authority, body, waiter)
        if data or request.method in _BODY_METHODS:
            head = request_head(request, authority, f"content-length: {len(data)}\r\n")
        else:
            head = request_head(request, authority, "")
        if not data:
            self._transport.write(head)
        elif len(data) < _LARGE_WRITE:
            self._transport.write(head + data)
        else:
            self._transport.writelines((head, data))
        self._request_sent = True
        return waiter

    async def _exchange_streaming(
        self, request: Request, authority: str, body: Body, waiter: asyncio.Future[Response]
    ) -> Response:
        length = body.length
        framing = "transfer-encoding: chunked\r\n" if length is None else f"content-length: {length}\r\n"
        self._transport.write(request_head(request, authority, framing))
        try:
            await self._send_body(body, length, waiter)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # superseded by this error: mark it retrieved
            raise
        return await waiter

    def abandon(self) -> None:
        """The exchange was cancelled or failed half-way: close, never pool again."""
        self._waiter = None
        self.abort()

    async def _send_body(self, body: Body, length: int | None, waiter: asyncio.Future[Response]) -> None:
        transport = self._transport
        sent = 0
        while True:
            chunk = await body.read()
            if not chunk:
                break
            if self._closed or waiter.done():
                return  # the upstream answered (or went away) before taking the whole body
            sent += len(chunk)
            if length is None:
                transport.writelines((chunk_prefix(len(chunk)), chunk, b"\r\n"))
            else:
                if sent > length:
                    raise RequestBodyError(400, f"request body longer than its Content-Length {length}")
                transport.write(chunk)
            if self._write_paused:
                await self._drain()
        if length is None:
            transport.write(LAST_CHUNK)
        elif sent != length:
            raise RequestBodyError(400, f"request body of {sent} bytes, Content-Length said {length}")
        self._request_sent = True

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _resolve(self, response: Response) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _end(self, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        self.generation += 1
        if self.owes_active:
            self.owes_active = False
            self._pool.ended(self.endpoint)
        if reusable and not self._closed:
            self._reused = True
            if self._read_paused:
                self._read_paused = False
                self._transport.resume_reading()
            self._pool.release(self)
        else:
            self.close()

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._pool.opened(self)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None and self._stream is None:
            self.close()  # bytes nobody asked for (or after a failure): never reuse
            return
        if not self._received:
            # The first bytes of the answer start its status line (see `_response`).
            self._received = True
            self._version = "1.1" if data.startswith(b"HTTP/1.1 ") else ""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            error = UpstreamError("upstream-reset", f"invalid response from {self.endpoint}: {exc}", sent=True)
            busy = self._waiter is not None or self._stream is not None
            if self._stream is not None:
                self._stream.fail(error)
                self._stream = None
            self._fail(error)
            if busy:
                self._end(False)
            self.abort()
            return
        if self._head_done and self._waiter is not None:
            # The head is here, the body is still arriving: hand out a stream.
            if self._hop is None:
                self._framing()  # else on_headers_complete did
            stream = self._stream = StreamBody(self._length, self, self._parts)
            self._parts = None
            self._resolve(self._response(stream))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._pool.lost(self)
        if self._waiter is not None:
            if self._reused and not self._received:
                self._fail(Stale())
            else:
                self._fail(
                    UpstreamError(
                        "upstream-reset",
                        f"{self.endpoint} closed the connection before a complete response",
                        sent=True,
                    )
                )
            self._end(False)
        elif self._stream is not None:
            stream, self._stream = self._stream, None
            if self._close_delimited and exc is None:
                stream.finish()
            else:
                message = f"{self.endpoint} closed the connection mid-body"
                stream.fail(UpstreamError("upstream-reset", message, sent=True))
            self._end(False)
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain_waiter
        if drain is not None:
            self._drain_waiter = None
            if not drain.done():
                drain.set_result(None)

    async def _drain(self) -> None:
        if self._closed:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            raise Stale  # a response nobody asked for: data_received closes the connection
        self._headers = []
        self._hop = None
        self._parts = None

    def on_header(self, name: bytes, value: bytes) -> None:
        """Decode a forwarded field as it arrives; anything else takes `_other_header`.

        httptools calls this once per complete field anyway, so a second pass over a
        list of raw fields would only add work. `_FORWARDED` holds only names that are
        forwarded as they are, so the common field costs one lookup and one decode.
        """
        key = _FORWARDED.get(name)
        if key is not None:
            self._headers.append((key, value.decode("latin-1")))
        else:
            self._other_header(name, value)

    def _other_header(self, name: bytes, value: bytes) -> None:
        """A hop-by-hop field (kept aside for `on_headers_complete`), or a name not yet cached."""
        key = _HOP_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if key not in HOP_BY_HOP:
                if len(_FORWARDED) < _FORWARDED_MAX:
                    _FORWARDED[name] = key
                self._headers.append((key, value.decode("latin-1")))
                return
            if len(_HOP_NAMES) < _FORWARDED_MAX:
                _HOP_NAMES[name] = key
        if key == "connection":
            if value in _PLAIN_CONNECTION:
                return  # names no field to drop; keep-alive itself is httptools' to judge
        elif key != "transfer-encoding" and key != "upgrade":
            return  # Keep-Alive, TE, Trailer, Proxy-*: dropped, with nothing to learn from them
        if self._hop is None:
            self._hop = [(key, value)]
        else:
            self._hop.append((key, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and status != 101:
            self._version = ""  # the real answer's own status line says its version
            return  # 100 Continue, 103 Early Hints: the real answer follows
        self._status = status
        self._keep_alive = parser.should_keep_alive()
        hop = self._hop
        self._chunked = False
        upgrade = ""
        if hop is not None:
            connection: str | None = None
            for key, value in hop:
                if key == "transfer-encoding":
                    self._chunked = b"chunked" in value.lower()
                elif key == "connection":
                    text = value.decode("latin-1")
                    connection = text if connection is None else f"{connection}, {text}"
                elif key == "upgrade":
                    upgrade = value.decode("latin-1")
            self._framing()  # now: Connection may name (and so drop) Content-Length
            if connection is not None and connection.strip().lower() not in _CONNECTION_KEYWORDS:
                self._headers = remove_named(self._headers, connection)
        if status == 101:
            self._headers.append(("upgrade", upgrade))
            return
        if self._head_request:
            # No body follows, whatever Content-Length says; httptools cannot be told so,
            # so this connection is not reused.
            self._resolve(self._response(EMPTY))
            self._end(False)
            return
        self._head_done = True

    def _framing(self) -> None:
        """Length and framing of a body that does not come with its head (a streamed one).

        Only a streamed body needs them, so they are found when one is handed out, or
        in `on_headers_complete` when hop-by-hop fields came (before Connection's removals).
        """
        if self._status in (204, 304):
            self._length = 0
        elif self._chunked:
            self._length = None
        else:
            content_length: str | None = None
            for key, value in self._headers:
                if key == "content-length":
                    content_length = value
            self._length = None if content_length is None else int(content_length)
        self._close_delimited = self._length is None and not self._chunked

    def on_body(self, data: bytes) -> None:
        stream = self._stream
        if stream is not None:
            stream.feed(data)
        elif self._parts is None:
            self._parts = [data]
        else:
            self._parts.append(data)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # an interim answer, or a HEAD response already handed out
        self._head_done = False
        stream = self._stream
        if stream is not None:
            self._stream = None
            stream.finish()
        else:
            # The whole body came with the head: resolve with a FixedBody (inlined
            # `_resolve(_response(...))`, this is the common exchange).
            parts = self._parts
            if parts is None:
                body: Body = EMPTY
            else:
                self._parts = None
                body = FixedBody(parts[0] if len(parts) == 1 else b"".join(parts))
            waiter = self._waiter
            self._waiter = None
            if waiter is not None and not waiter.done():
                waiter.set_result(self._response(body))
        self._end(self._keep_alive and self._request_sent and not self._closed)

    def _response(self, body: Body) -> Response:
        """The Response for the head just parsed.

        `endpoint` and `version` are set after construction: passing them as keywords
        costs more than the two attribute writes (this runs once per exchange). The
        version is read off the first bytes of the answer when they say HTTP/1.1
        (`data_received`): httptools formats a new string for every call.
        """
        response = Response(self._status, self._headers, body)
        response.endpoint = self.endpoint
        response.version = self._version or self._parser.get_http_version()
        return response

    def _switched(self, early: bytes) -> None:
        """The upstream answered 101: the connection becomes the upstream half of a tunnel."""
        self._transport.pause_reading()
        self.generation += 1
        if self.owes_active:  # pragma: no cover - a 101 has no body to stream
            self.owes_active = False
        self._pool.lost(self)  # never pooled again; the tunnel owns the transport now
        response = self._response(EMPTY)
        response.tunnel = Tunnel(self._transport, early)
        self._resolve(response)

    # -- BodySource (response bodies) ------------------------------------------------

    def pause_body(self) -> None:
        if not self._closed:
            self._read_paused = True
            self._transport.pause_reading()

    def resume_body(self) -> None:
        if not self._closed and self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()

    def body_reading(self, body: StreamBody) -> None:
        pass

    def body_closed(self, body: StreamBody) -> None:
        # The reader gave up before the end: the rest of the body would poison the connection.
        if body is self._stream:
            self._stream = None
            self._end(False)


def request_head(request: Request, authority: str, framing: str) -> bytes:
    """The request head sent upstream: request line, Host, the forwarded fields, `framing`.

    Built by appending to one string (CPython grows it in place) and encoded once:
    values are latin-1 on the wire, and one outside latin-1 (set by policy) is sent as
    UTF-8 rather than failing the request.
    """
    text = f"{request.method} {request.target} HTTP/1.1\r\nhost: {authority}\r\n"
    for name, value in request.headers:
        if name not in NOT_FORWARDED:
            text += f"{name}: {value}\r\n"
    if request.upgrade:
        upgrade = request.header("upgrade") or ""
        text += f"connection: upgrade\r\nupgrade: {upgrade}\r\n\r\n"
    else:
        text += f"{framing}\r\n"
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
