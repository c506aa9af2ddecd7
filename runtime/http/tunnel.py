"""Upgrade (WebSocket, h2c ...) tunnels: after a 101, splice two connections byte for byte.

    client ──► listener (server.py) ── 101 written ──► Tunnel.attach(client transport)
                                                          │
    upstream connection (client.py) saw 101 ─► Tunnel ◄───┘
                                                          ▼
                client transport ⇄ _Splice ⇄ upstream transport   (until either side closes)

The upgrade request is routed and authorized by the chain like any other; only the
upstream's 101 answer turns the two connections into a tunnel. Each side's protocol is
replaced by a `_Splice` that writes what it reads to the other side and applies flow
control both ways: when one transport's write buffer passes its high-water mark, the
other side stops reading until it drains, so a tunnel buffers a bounded amount.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Tunnel"]


class Tunnel:
    """The upstream half of an upgraded connection, waiting to be spliced to the client's.

    `early` holds bytes the upstream sent right after its 101 head (a WebSocket frame, say);
    they go to the client first. Whoever holds a Tunnel must `attach` or `close` it.
    """

    __slots__ = ("_upstream", "_early", "_closed", "_eofs", "_lost")

    def __init__(self, upstream: asyncio.Transport, early: bytes = b"") -> None:
        self._upstream = upstream
        self._early = early
        self._closed = False
        self._eofs = 0
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def attach(self, client: asyncio.Transport, client_early: bytes = b"") -> None:
        """Splice `client` (its 101 already written) and the upstream until either closes."""
        upstream = self._upstream
        if self._closed or upstream.is_closing():
            client.close()
            self._set_lost()
            return
        client.set_protocol(_Splice(self, upstream))
        upstream.set_protocol(_Splice(self, client))
        if self._early:
            client.write(self._early)
            self._early = b""
        if client_early:
            upstream.write(client_early)
        client.resume_reading()
        upstream.resume_reading()

    def close(self) -> None:
        """Close the upstream connection (the tunnel will not be attached)."""
        self._closed = True
        self._upstream.close()
        self._set_lost()

    def on_closed(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) once the tunnel is over, or soon if it already is."""
        self._lost.add_done_callback(lambda _: callback())

    async def wait_closed(self) -> None:
        """Wait until the tunnel is over (a side closed; the other is being closed)."""
        await asyncio.shield(self._lost)

    def _half_closed(self) -> bool:
        self._eofs += 1
        return self._eofs >= 2

    def _set_lost(self) -> None:
        if not self._lost.done():
            self._lost.set_result(None)


class _Splice(asyncio.Protocol):
    """One side of a tunnel: what arrives here is written to `peer`."""

    __slots__ = ("_tunnel", "_peer", "_transport")

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport) -> None:
        self._tunnel = tunnel
        self._peer = peer
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._peer.write(data)

    def eof_received(self) -> bool:
        peer = self._peer
        if self._tunnel._half_closed() or not peer.can_write_eof():
            peer.close()
            return False
        peer.write_eof()
        return True  # keep our side open: the other direction may still carry data

    def pause_writing(self) -> None:
        # Our transport's write buffer is full: stop reading what would be written to it.
        if not self._peer.is_closing():
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        if not self._peer.is_closing():
            self._peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer.close()
        self._tunnel._set_lost()
