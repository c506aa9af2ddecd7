"""Bounds for the HTTP/1.1 layer: what one connection or request may cost the proxy.

Every limit here is applied at the edge that receives the traffic, answers with a clear
status (400, 408, 413, 431) and closes the connection, so a bad or hostile peer changes
nothing for the others (DESIGN.md "Reliability rules": everything that grows has a bound).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HttpLimits"]


@dataclass(frozen=True)
class HttpLimits:
    """Limits for listeners (client side) and the upstream pool.

    max_header_bytes        request line + header fields; over it: 431 and close
    max_headers             number of header fields; over it: 431 and close
    header_timeout          seconds to receive a complete request head (slowloris): 408, close
    idle_timeout            a keep-alive connection with nothing to do is closed after this
    max_request_body        bytes; over it: 413 (None: unlimited, streamed)
    max_pipelined           requests queued on one connection before the listener stops reading
                            (the requests of the read that crossed it are parsed too)
    upstream_max_idle_per_endpoint  idle keep-alive connections kept per upstream endpoint
    upstream_connect_timeout        seconds to connect to an upstream endpoint
    """

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_request_body: int | None = None
    max_pipelined: int = 16
    upstream_max_idle_per_endpoint: int = 256
    upstream_connect_timeout: float = 5.0
