"""HTTP/1.1 on asyncio Protocols with httptools: the proxy's listeners and upstream pool.

    server.py   start_listener(): parse (reader.py), bound, dispatch in order, write
    client.py   UpstreamPool: bounded keep-alive pools per endpoint; send() -> Response
    connection.py  one upstream connection, one exchange at a time
    body.py     StreamBody: bodies streamed between sockets with flow control
    headers.py  hop-by-hop removal (RFC 9110 §7.6.1), x-forwarded-for
    tunnel.py   Upgrade (WebSocket) tunnels after a 101
    limits.py   HttpLimits; errors.py the exception tree; wire.py head serialization
"""

# Names resolve on first use (PEP 562), like starmesh.runtime's.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
    from starmesh.runtime.http.body import StreamBody
    from starmesh.runtime.http.client import UpstreamPool
    from starmesh.runtime.http.errors import HttpError, RequestBodyError, UpstreamError
    from starmesh.runtime.http.limits import HttpLimits
    from starmesh.runtime.http.server import Dispatch, PeerIdentity, start_listener
    from starmesh.runtime.http.tunnel import Tunnel

__all__ = [
    "Dispatch",
    "HttpError",
    "HttpLimits",
    "PeerIdentity",
    "RequestBodyError",
    "StreamBody",
    "Tunnel",
    "UpstreamError",
    "UpstreamPool",
    "start_listener",
]

_WHERE: dict[str, str] = {
    "Dispatch": "starmesh.runtime.http.server",
    "HttpError": "starmesh.runtime.http.errors",
    "HttpLimits": "starmesh.runtime.http.limits",
    "PeerIdentity": "starmesh.runtime.http.server",
    "RequestBodyError": "starmesh.runtime.http.errors",
    "StreamBody": "starmesh.runtime.http.body",
    "Tunnel": "starmesh.runtime.http.tunnel",
    "UpstreamError": "starmesh.runtime.http.errors",
    "UpstreamPool": "starmesh.runtime.http.client",
    "start_listener": "starmesh.runtime.http.server",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
