"""The upstream client: bounded keep-alive pools per endpoint (connection.py: one exchange).

    UpstreamPool.send(endpoint, request)
        idle connection (LIFO) or connect ─► write head (+ body) ─► await response head
        ─► Response (body complete: FixedBody; else a StreamBody fed by the connection)
        ─► connection back to the pool once the body has been read to its end

The request is re-framed here, never forwarded with the client's framing: Content-Length
when the body's length is known, chunked otherwise; hop-by-hop fields are never written
(runtime/http/headers.py). Failures map to `UpstreamError`: "upstream-unavailable" when
connecting failed (nothing was sent), "upstream-reset" when the upstream reset or closed
before a complete response head. A pooled connection found closed on reuse before any
response byte arrived is retried once on a fresh connection, when the body can be replayed.

`send` is cancellation-safe: a cancelled exchange closes its connection (never pooled
again), and the pool holds no task of its own.

TLS origination (mTLS: runtime/chain.py's OutboundMTLS) uses pools of their own, one
per expected peer identity, made by `originating(key, context, verify)`: connections
are pooled per (endpoint, identity), apart from plaintext ones; each new connection
gets the context of the moment (certificate rotation) and `verify(endpoint, transport)`
right after the handshake, which raises UpstreamError to refuse the peer before
anything is sent. They share the parent's in-flight counts (`active(endpoint)` counts
every request to an endpoint), are closed and retained with it, and are held weakly:
one that no route table uses and that has no connection left goes away.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Callable, Collection

from starmesh.runtime.http.body import StreamBody
from starmesh.runtime.http.connection import Stale, UpstreamConnection
from starmesh.runtime.http.errors import UpstreamError
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.message import Request, Response

__all__ = ["PeerCheck", "UpstreamError", "UpstreamPool"]

PeerCheck = Callable[[str, asyncio.BaseTransport], None]
"""Called with (endpoint, transport) after a TLS handshake; raises UpstreamError to refuse the peer."""


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to upstream endpoints ("host:port"), bounded per endpoint."""

    def __init__(
        self,
        limits: HttpLimits = HttpLimits(),
        *,
        ssl_for: Callable[[str], ssl.SSLContext | None] | None = None,
        verify_peer: PeerCheck | None = None,
    ) -> None:
        self._limits = limits
        self._max_idle = limits.upstream_max_idle_per_endpoint
        self._ssl_for = ssl_for
        self._verify_peer = verify_peer
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._active: dict[str, int] = {}
        self._connections: set[UpstreamConnection] = set()
        self._originating: weakref.WeakValueDictionary[str, UpstreamPool] = weakref.WeakValueDictionary()
        self._closed = False

    def active(self, endpoint: str) -> int:
        """Requests in flight to `endpoint`: connecting, waiting, or streaming a response body."""
        return self._active.get(endpoint, 0)

    def idle(self, endpoint: str) -> int:
        """Idle keep-alive connections pooled for `endpoint`."""
        return len(self._idle.get(endpoint, ()))

    def connections(self) -> int:
        """Open connections, idle or busy, to all endpoints (TLS pools' included)."""
        return len(self._connections) + sum(child.connections() for child in list(self._originating.values()))

    def originating(self, key: str, context: Callable[[], ssl.SSLContext], verify: PeerCheck) -> UpstreamPool:
        """The pool that originates TLS for peer identity `key` (one per key while it is used).

        `context()` is asked for at each new connection; `verify` checks the peer after
        the handshake. The pool shares this one's in-flight counts and is closed and
        retained with it; the caller keeps it alive (the routes that send through it)."""
        child = self._originating.get(key)
        if child is None:
            child = UpstreamPool(self._limits, ssl_for=lambda _endpoint: context(), verify_peer=verify)
            child._active = self._active
            child._closed = self._closed
            self._originating[key] = child
        return child

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        """Send `request` to `endpoint` and return the response once its head has arrived.

        `host` is the Host header sent (default: `request.authority`, else `request.service`).
        The response body streams; read it to the end or close it. Raises UpstreamError,
        or RequestBodyError when the client's body fails while it is being forwarded.
        """
        if self._closed:
            raise UpstreamError("upstream-unavailable", f"{endpoint}: the upstream pool is closed", sent=False)
        authority = host or request.authority or request.service
        active = self._active
        active[endpoint] = active.get(endpoint, 0) + 1
        # The newest idle connection (LIFO), inlined: a method call costs more than this.
        conn = None
        idle = self._idle.get(endpoint)
        while idle:
            candidate = idle.pop()
            if candidate.usable:
                candidate.usable = False
                conn = candidate
                break
        generation = -1
        try:
            if conn is not None:
                generation = conn.generation
                try:
                    response = await conn.exchange(request, authority)
                except Stale:
                    if request.body.complete() is None:
                        raise UpstreamError(
                            "upstream-reset", f"{endpoint} closed a reused connection", sent=True
                        ) from None
                    conn = None
            if conn is None:
                conn = await self._connect(endpoint)
                generation = conn.generation
                response = await conn.exchange(request, authority)
        except BaseException as exc:
            active[endpoint] -= 1
            if conn is not None and conn.generation == generation:
                conn.abandon()  # cancelled or failed mid-exchange: never reused
            if isinstance(exc, Stale):  # pragma: no cover - a fresh connection is never stale
                raise UpstreamError("upstream-reset", f"{endpoint} closed the connection", sent=True) from None
            raise
        body = response.body
        if isinstance(body, StreamBody) and not body.done:
            conn.owes_active = True  # the connection ends the exchange when the body ends
        else:
            active[endpoint] -= 1
        return response

    def retain(self, endpoints: Collection[str]) -> None:
        """Close idle connections to endpoints not in `endpoints` (after an apply)."""
        keep = set(endpoints)
        for endpoint in [e for e in self._idle if e not in keep]:
            for conn in self._idle.pop(endpoint):
                conn.usable = False
                conn.close()
        for endpoint in [e for e, n in self._active.items() if n <= 0 and e not in keep]:
            del self._active[endpoint]
        for child in list(self._originating.values()):
            child.retain(keep)

    async def close(self) -> None:
        """Close every connection, idle or busy, and wait until they are closed."""
        self._closed = True
        self._idle.clear()
        for child in list(self._originating.values()):
            await child.close()
        conns = list(self._connections)
        for conn in conns:
            conn.usable = False
            conn.abort()
        if conns:
            await asyncio.wait([asyncio.ensure_future(conn.lost) for conn in conns], timeout=5.0)

    # -- the connections' side ---------------------------------------------------------

    async def _connect(self, endpoint: str) -> UpstreamConnection:
        host, sep, port_text = endpoint.rpartition(":")
        if not sep or not port_text.isdigit():
            raise UpstreamError("upstream-unavailable", f"invalid endpoint {endpoint!r} (want host:port)", sent=False)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        context = self._ssl_for(endpoint) if self._ssl_for is not None else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._limits.upstream_connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, endpoint, loop),
                    host,
                    int(port_text),
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except OSError as exc:  # refused, unreachable, TLS handshake, and the connect timeout
            detail = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise UpstreamError("upstream-unavailable", f"cannot connect to {endpoint}: {detail}", sent=False) from exc
        if self._verify_peer is not None:
            try:
                self._verify_peer(endpoint, transport)
            except BaseException:
                conn.abort()  # refused before anything was sent: never used, never pooled
                raise
        return conn

    # -- ConnectionOwner: what the pool's connections report ----------------------------

    def release(self, conn: UpstreamConnection) -> None:
        """Pool `conn` for reuse (LIFO), or close it when the endpoint's idle list is full."""
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(conn.endpoint)
        if idle is None:
            idle = self._idle[conn.endpoint] = []
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.usable = True
        idle.append(conn)

    def opened(self, conn: UpstreamConnection) -> None:
        """Track `conn` so that `close` can close it."""
        self._connections.add(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """Forget `conn`: it closed, or it became a tunnel."""
        self._connections.discard(conn)
        if conn.usable:
            conn.usable = False
            idle = self._idle.get(conn.endpoint)
            if idle is not None and conn in idle:
                idle.remove(conn)

    def ended(self, endpoint: str) -> None:
        """A streamed response body to `endpoint` ended: one request less in flight."""
        self._active[endpoint] = self._active.get(endpoint, 1) - 1
