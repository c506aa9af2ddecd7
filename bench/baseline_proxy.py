"""A plain forwarding HTTP/1.1 proxy with no policy: the floor for a Python proxy here.

    .venv/bin/python bench/baseline_proxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:8080

asyncio Protocols on uvloop, httptools parsing on both sides, keep-alive to the one
upstream through a small pool of idle connections, and no task, coroutine or future
per request: a parsed request is written to a pooled upstream connection from the
parser callback, and the parsed response is written back from the upstream's. Headers
are re-serialized (hop-by-hop fields dropped, bodies re-framed with Content-Length),
as any proxy that parses must. Prints `listening HOST:PORT` once bound.

It is the reference bench/proxy.py measures starmesh's proxy against: what a minimal
protocol-level proxy costs on this machine. Not a product: bodies are buffered whole,
responses to HEAD are not supported, and there are no limits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys

import httptools
import uvloop

__all__ = ["Client", "Pool", "Upstream", "main"]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length"}
)
MAX_IDLE = 64
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Pool:
    """Idle keep-alive connections to the upstream; a new one is opened when none is idle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.loop, self.host, self.port = loop, host, port
        self.idle: list[Upstream] = []

    def send(self, client: Client, request: bytes) -> None:
        if self.idle:
            self.idle.pop().send(client, request)
        else:
            self.loop.create_task(self._connect_and_send(client, request))

    async def _connect_and_send(self, client: Client, request: bytes) -> None:
        try:
            _, upstream = await self.loop.create_connection(lambda: Upstream(self), self.host, self.port)
        except OSError:
            client.fail()
            return
        upstream.send(client, request)


class Upstream(asyncio.Protocol):
    """One connection to the upstream; parses the response and hands it to its client."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.reason = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, client: Client, request: bytes) -> None:
        self.client, self.headers, self.body = client, [], []
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        body = b"".join(self.body)
        head = b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n\r\n" % (
            self.parser.get_status_code(), self.reason, b"".join(self.headers), len(body)
        )
        if self.parser.should_keep_alive() and len(self.pool.idle) < MAX_IDLE:
            self.pool.idle.append(self)
        elif self.transport is not None:
            self.transport.close()
        if client is not None:
            client.respond(head + body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.client is not None:
            self.client.fail()
            self.client = None


class Client(asyncio.Protocol):
    """One downstream connection; requests are forwarded one at a time, in order."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[tuple[bytes, bool]] = collections.deque()
        self.busy = False
        self.close_after = False
        self.url = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        framing = b"content-length: %d\r\n" % len(body) if body else b""
        request = b"%s %s HTTP/1.1\r\n%s%s\r\n%s" % (
            self.parser.get_method(), self.url, b"".join(self.headers), framing, body
        )
        self.waiting.append((request, self.parser.should_keep_alive()))
        if not self.busy:
            self._next()

    def _next(self) -> None:
        request, keep_alive = self.waiting.popleft()
        self.busy, self.close_after = True, not keep_alive
        self.pool.send(self, request)

    def respond(self, response: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(response)
        self.busy = False
        if self.close_after:
            self.transport.close()
        elif self.waiting:
            self._next()

    def fail(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(BAD_GATEWAY)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(loop, *upstream)
    server = await loop.create_server(lambda: Client(pool), *listen, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    args = parser.parse_args()
    try:
        uvloop.run(_serve(_address(args.listen), _address(args.upstream)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
