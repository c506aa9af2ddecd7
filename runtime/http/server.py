"""The listeners: HTTP/1.1 on an asyncio Protocol with httptools, one dispatch per request.

    bytes ─► RequestReader (reader.py) ─► Request ─► queue ─► serve task: dispatch(request)
                                                                   │
    client ◄── one write (head + complete body) or a flow-controlled stream ◄── Response

One `_ServerConnection` per client connection and one task per connection (started with
its first request): requests are dispatched one at a time and answered in order; up to
`max_pipelined` more are queued before the connection stops reading. A client that goes
away (EOF or reset) cancels the request in flight, so upstream work stops.

Protocol errors (reader.py) are answered with a one-line text body after the answers to
the requests before them, and the connection is closed: 400 malformed or ambiguous
framing, 405 CONNECT, 408 head not complete within `header_timeout`, 413 body over
`max_request_body`, 431 head over `max_header_bytes` or `max_headers`.

Responses are re-framed here: Content-Length when the body is complete or its length
known, chunked toward HTTP/1.1 clients otherwise (close-delimited for HTTP/1.0); hop-by-hop
fields are never written. `Expect: 100-continue` is answered only when the handler first
reads the body, so a 403 or 429 never invites it. After an upstream's 101 the connection
becomes a tunnel (tunnel.py).

On the inbound side, identity headers from outside are dropped while parsing (reader.py:
`x-forwarded-client-cert` and every `x-starmesh-*`), and `request.source` is only what
the connection proved. With `tls=InboundTLS(...)` the inbound listener is a mesh
listener (runtime/tls.py): each connection is TLS or plaintext per the mode at accept
time, a TLS peer's SVID becomes the source, and a peer refused after the handshake is
closed before any request is read.

With `connections`, each listener counts its open connections in the recorder's gauge
(`starmesh_active_connections{listener}`): one add when a connection is served, one
subtract when it is lost or its tunnel ends; nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, cast, overload

from starmesh.runtime.http.body import StreamBody
from starmesh.runtime.http.errors import RequestBodyError, UpstreamError
from starmesh.runtime.http.headers import HOP_BY_HOP
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.http.reader import RequestReader
from starmesh.runtime.http.tunnel import Tunnel
from starmesh.runtime.http.wire import CONTINUE, LAST_CHUNK, chunk_prefix, encode_head, status_line
from starmesh.runtime.message import Body, FixedBody, Request, Response, proxy_response
from starmesh.runtime.telemetry import Count, Listener
from starmesh.runtime.tls import InboundTLS, MeshListener, PeerRefused

__all__ = ["Dispatch", "PeerIdentity", "start_listener"]

Dispatch = Callable[[Request], Awaitable[Response]]
"""What a listener calls for each request: picks the route table and runs the chain."""

PeerIdentity = Callable[[asyncio.Transport], "str | None"]
"""The caller's identity proven by the connection (mTLS), read once per connection."""

Connections = Callable[[Listener], Count]
"""The gauge cell of a listener's open connections (`Recorder.connections`)."""

_log = logging.getLogger(__name__)

_SKIP = HOP_BY_HOP | {"content-length"}
"""Response fields never copied: hop-by-hop, and the framing the listener writes itself."""

_SKIP_KEEP_LENGTH = HOP_BY_HOP
"""For answers without a body (HEAD, 204, 304): the upstream's Content-Length stays."""

_SKIP_UPGRADE = HOP_BY_HOP - {"upgrade"}
"""For a 101: Upgrade names the protocol switched to."""

# Why reading is paused (a bit each; reading resumes when none is left).
_PAUSE_PIPELINE, _PAUSE_BODY, _PAUSE_STOPPED = 1, 2, 4

_LARGE_WRITE = 64 * 1024

_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024
"""How long and how much a closing connection still reads (and discards) after its FIN."""


@overload
async def start_listener(
    host: str,
    port: int,
    dispatch: Dispatch,
    *,
    side: Literal["outbound", "inbound"],
    limits: HttpLimits = ...,
    ssl: _ssl.SSLContext | None = ...,
    peer_identity: PeerIdentity | None = ...,
    forwarded_for: bool = ...,
    tls: None = ...,
    connections: Connections | None = ...,
) -> asyncio.Server: ...


@overload
async def start_listener(
    host: str,
    port: int,
    dispatch: Dispatch,
    *,
    side: Literal["inbound"],
    limits: HttpLimits = ...,
    forwarded_for: bool = ...,
    tls: InboundTLS,
    connections: Connections | None = ...,
) -> MeshListener: ...


async def start_listener(
    host: str,
    port: int,
    dispatch: Dispatch,
    *,
    side: Literal["outbound", "inbound"],
    limits: HttpLimits = HttpLimits(),
    ssl: _ssl.SSLContext | None = None,
    peer_identity: PeerIdentity | None = None,
    forwarded_for: bool = True,
    tls: InboundTLS | None = None,
    connections: Connections | None = None,
) -> asyncio.Server | MeshListener:
    """Listen on `host:port` and answer every request with `dispatch(request)`.

    `side` says which listener this is; on "inbound", identity headers are dropped from
    requests and `peer_identity(transport)` (when given) becomes `request.source` for
    every request on that connection. `ssl` makes it a TLS listener. `tls` (inbound
    only) makes it a mesh listener instead: TLS or plaintext per connection as the
    current mtls mode says, the source proven by the peer's SVID (runtime/tls.py).
    `forwarded_for` appends the client address to x-forwarded-for. `connections` gives
    the gauge cells for open connections (`side`'s; a mesh listener's mTLS ones count
    as "mesh"). Close the returned server to stop accepting; open connections finish
    on their own.
    """
    loop = asyncio.get_running_loop()
    inbound = side == "inbound"
    count = connections(side) if connections is not None else None
    if tls is not None:
        if not inbound:
            raise ValueError("mTLS (tls=) is for the inbound listener only")
        plaintext = tls.guard(dispatch)
        mesh_count = connections("mesh") if connections is not None else None

        def mesh_factory(identity: PeerIdentity | None) -> _ServerConnection:
            if identity is not None:
                return _ServerConnection(loop, dispatch, limits, identity, forwarded_for, True, mesh_count)
            return _ServerConnection(loop, plaintext, limits, None, forwarded_for, True, count)

        return await MeshListener.start(host, port, mesh_factory, tls)
    identity = peer_identity if inbound else None

    def factory() -> _ServerConnection:
        return _ServerConnection(loop, dispatch, limits, identity, forwarded_for, inbound, count)

    return await loop.create_server(factory, host, port, ssl=ssl, reuse_address=True, backlog=1024)


def _uncount(count: Count) -> None:
    count.n -= 1


def _plain(status: int, message: str) -> Response:
    """A protocol-level answer: one line of text (no x-starmesh-error)."""
    data = f"{message}\n".encode()
    return Response(status, [("content-type", "text/plain; charset=utf-8")], FixedBody(data))


class _ServerConnection(asyncio.Protocol):
    """One client connection: read (reader.py), dispatch in order, write, time out."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dispatch: Dispatch,
        limits: HttpLimits,
        peer_identity: PeerIdentity | None,
        forwarded_for: bool,
        strip_identity: bool,
        open_count: Count | None = None,
    ) -> None:
        self._loop = loop
        self._open_count = open_count  # counted from connection_made until lost (or its tunnel ends)
        self._counted: Count | None = None
        self._dispatch = dispatch
        self._limits = limits
        self._max_pipelined = limits.max_pipelined
        self._tick = min(limits.header_timeout, limits.idle_timeout)
        self._peer_identity = peer_identity
        self._forwarded_for = forwarded_for
        self._strip_identity = strip_identity
        self._reader: RequestReader = None  # type: ignore[assignment]
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._closed = False
        self._early = b""
        self._paused_by = 0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._current: Request | None = None
        self._close_after = False
        self._fatal: Response | None = None
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lingering: int | None = None  # bytes discarded while closing, None: not closing

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        source = None
        if self._peer_identity is not None:
            try:
                source = self._peer_identity(self._transport)
            except Exception as exc:  # noqa: BLE001 - a peer that proves nothing is closed, never served
                if not isinstance(exc, PeerRefused):  # (PeerRefused has been logged where it was raised)
                    _log.exception("checking a peer's identity failed; closing its connection")
                self._closed = True
                self._transport.abort()
                return
        counted = self._open_count
        if counted is not None:
            counted.n += 1
            self._counted = counted
        self._reader = RequestReader(
            self,
            self._limits,
            self._loop.time,
            client=str(peer[0]) if peer else "",
            source=source,
            forwarded_for=self._forwarded_for,
            strip_identity=self._strip_identity,
        )
        self._idle_since = self._loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._lingering += len(data)
            if self._lingering > _LINGER_BYTES:
                self._transport.close()
            return
        if self._reader.stopped:
            if len(self._early) < 65536:
                self._early += data  # after an Upgrade head: tunnel bytes (reading is paused)
            return
        self._reader.feed(data)

    def eof_received(self) -> bool:
        # Like nginx: a client that stops sending has gone away; the transport closes and
        # connection_lost cancels the request in flight (so upstream work stops).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        counted = self._counted
        if counted is not None:
            counted.n -= 1
            self._counted = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reader is not None:
            self._reader.fail_body(RequestBodyError(400, "the client closed the connection mid-body"))
        for request in self._queue:
            request.body.close()
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- ReaderOwner -----------------------------------------------------------------

    def enqueue(self, request: Request) -> None:
        queue = self._queue
        queue.append(request)
        if len(queue) > self._max_pipelined:
            self._pause(_PAUSE_PIPELINE)
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        else:
            wakeup = self._wakeup
            if wakeup is not None:
                self._wakeup = None
                wakeup.set_result(None)

    def reject(self, status: int, message: str) -> None:
        self._pause(_PAUSE_STOPPED)
        stream = self._reader.stream
        if stream is not None:
            # Its head was dispatched: the handler reading the body gets the error.
            self._close_after = True
            self._reader.fail_body(RequestBodyError(status, message))
            return
        self._fatal = _plain(status, message)
        if self._current is None and not self._queue:
            self._close(self._fatal)

    def head_started(self) -> None:
        self._idle_since = None
        if self._timer is None:
            self._arm()

    def upgraded(self, early: bytes) -> None:
        self._early = early
        self._pause(_PAUSE_STOPPED)

    # -- BodySource (request bodies) -------------------------------------------------

    def pause_body(self) -> None:
        self._pause(_PAUSE_BODY)

    def resume_body(self) -> None:
        self._unpause(_PAUSE_BODY)

    def body_reading(self, body: StreamBody) -> None:
        reader = self._reader
        if body is reader.continue_body:
            reader.continue_body = None
            current = self._current
            if not self._closed and current is not None and current.body is body:
                self._transport.write(CONTINUE)

    def body_closed(self, body: StreamBody) -> None:
        # The rest of this body will not be read: the connection cannot be reused.
        self._close_after = True

    # -- requests in, responses out --------------------------------------------------

    async def _serve(self) -> None:
        """The connection's one task: dispatch queued requests in order, write each answer."""
        queue = self._queue
        dispatch = self._dispatch
        try:
            while not self._closed:
                if not queue:
                    wakeup = self._wakeup = self._loop.create_future()
                    await wakeup
                    continue
                request = queue.popleft()
                if self._paused_by & _PAUSE_PIPELINE and len(queue) <= self._max_pipelined:
                    self._unpause(_PAUSE_PIPELINE)
                self._current = request
                try:
                    response = await dispatch(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
                    response = self._error_response(exc)
                if self._closed:
                    _discard(response)
                    return
                if response.tunnel is not None or request.upgrade:
                    answer = self._upgrade_answer(request, response)
                    if answer is None:
                        return
                    response = answer
                if not self._respond(request, response):
                    body = response.body
                    await self._stream_response(body, body.length is None and request.version == "1.1")
                if not self._next():
                    return
        except Exception:  # noqa: BLE001 - a bug here must not leave the client hanging
            _log.exception("HTTP listener connection failed")
            self._closed = True
            self._transport.abort()

    def _error_response(self, exc: Exception) -> Response:
        if isinstance(exc, RequestBodyError):
            self._close_after = True
            return _plain(exc.status, str(exc))
        if isinstance(exc, UpstreamError):
            return proxy_response(503, exc.reason, str(exc))
        if isinstance(exc, TimeoutError):
            return proxy_response(504, "timeout", "the request timed out")
        _log.exception("request handler failed")
        self._close_after = True
        return _plain(500, "internal proxy error")

    def _upgrade_answer(self, request: Request, response: Response) -> Response | None:
        """Switch to a tunnel after a 101 (None), or the response to write before closing."""
        tunnel = response.tunnel
        if request.upgrade and response.status == 101 and isinstance(tunnel, Tunnel):
            self._transport.write(
                encode_head(status_line(101), response.headers, _SKIP_UPGRADE, "connection: upgrade\r\n\r\n")
            )
            self._current = None
            self._closed = True  # this protocol is done with the connection
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            early, self._early = self._early, b""
            tunnel.attach(self._transport, early)
            counted, self._counted = self._counted, None
            if counted is not None:  # the connection stays open as a tunnel: count it until it ends
                tunnel.on_closed(lambda: _uncount(counted))
            return None
        self._close_after = True  # the bytes after an Upgrade head cannot be parsed as HTTP
        if tunnel is not None:
            _discard(response)
            return _plain(502, "the upstream switched protocols without an Upgrade request")
        return response

    def _respond(self, request: Request, response: Response) -> bool:
        """Write the head, and the body when it is complete; False if it must be streamed."""
        status = response.status
        body = response.body
        close = self._close_after or not request.keep_alive or self._reader.parsing is request
        if close:
            tail = "connection: close\r\n\r\n"
            self._close_after = True
        else:
            tail = "connection: keep-alive\r\n\r\n" if request.version == "1.0" else "\r\n"
        if status < 200 or status in (204, 304) or request.method == "HEAD":
            self._transport.write(encode_head(status_line(status), response.headers, _SKIP_KEEP_LENGTH, tail))
            body.close()
            return True
        data = body.complete()
        if data is not None:
            size = len(data)
            head = encode_head(status_line(status), response.headers, _SKIP, f"content-length: {size}\r\n{tail}")
            if size < _LARGE_WRITE:
                self._transport.write(head + data)
            else:
                self._transport.writelines((head, data))
            return True
        length = body.length
        if length is not None:
            framing = f"content-length: {length}\r\n"
        elif request.version == "1.1":
            framing = "transfer-encoding: chunked\r\n"
        else:
            framing = ""  # HTTP/1.0: the body ends when the connection does
            self._close_after = True
            tail = "connection: close\r\n\r\n"
        self._transport.write(encode_head(status_line(status), response.headers, _SKIP, framing + tail))
        return False

    async def _stream_response(self, body: Body, chunked: bool) -> None:
        """Copy a streamed body to the client with flow control; abort the client on failure."""
        read = body.read
        transport = self._transport
        expected = body.length
        sent = 0
        try:
            while True:
                chunk = await read()
                if not chunk:
                    break
                if self._closed:
                    return
                sent += len(chunk)
                if chunked:
                    transport.writelines((chunk_prefix(len(chunk)), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    await self._drain()
            if expected is not None and sent != expected:
                raise ValueError(f"response body had {sent} bytes, Content-Length said {expected}")
            if chunked:
                transport.write(LAST_CHUNK)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken body ends the connection, never the process
            self._close_after = True
            transport.abort()
        finally:
            body.close()

    def _next(self) -> bool:
        """The current response is written: close, go on with the queue, or idle."""
        self._current = None
        if self._closed:
            return False
        if self._close_after:
            self._close(self._fatal if not self._queue else None)
            return False
        if self._queue:
            return True
        if self._fatal is not None:
            self._close(self._fatal)
            return False
        if self._reader.head_begun is None and self._reader.parsing is None:
            self._idle_since = self._loop.time()
            if self._timer is None:
                self._arm()
        return True

    def _close(self, final: Response | None) -> None:
        """Close the connection, after writing `final` (a protocol error's answer) if given.

        A lingering close: send FIN, then read and discard what the client still sends
        (a body nobody read) for a bounded time and size, so the client's kernel does not
        answer our close with a reset that destroys the response before it is read.
        """
        transport = self._transport
        if final is not None:
            self._fatal = None
            data = final.body.complete() or b""
            tail = f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
            transport.write(encode_head(status_line(final.status), final.headers, _SKIP, tail) + data)
        if self._closed or self._lingering is not None or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering = 0
        self._reader.stopped = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(_LINGER_SECONDS, transport.close)
        self._paused_by = 0
        transport.resume_reading()

    # -- timers and flow control -----------------------------------------------------

    def _arm(self) -> None:
        """One timer per connection, firing at least every `tick` while it has a deadline."""
        self._timer = self._loop.call_at(self._loop.time() + self._tick, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        begun = self._reader.head_begun
        if begun is not None:
            deadline = begun + self._limits.header_timeout
            if now >= deadline:
                self._reader.reject(408, f"request head not received within {self._limits.header_timeout:g}s")
                return
        elif self._idle_since is not None and self._current is None and not self._queue:
            deadline = self._idle_since + self._limits.idle_timeout
            if now >= deadline:
                self._transport.close()
                return
        else:
            return  # busy: the next idle period or head re-arms the timer
        self._timer = self._loop.call_at(min(deadline, now + self._tick), self._on_timer)

    def _pause(self, reason: int) -> None:
        if not self._paused_by and not self._closed:
            self._transport.pause_reading()
        self._paused_by |= reason

    def _unpause(self, reason: int) -> None:
        if self._paused_by & reason:
            self._paused_by &= ~reason
            if not self._paused_by and not self._closed:
                self._transport.resume_reading()

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("the client closed the connection")
        waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _discard(response: Response) -> None:
    response.body.close()
    if isinstance(response.tunnel, Tunnel):
        response.tunnel.close()
