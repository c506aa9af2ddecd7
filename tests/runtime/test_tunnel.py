"""Upgrade requests (WebSocket-style) through the listener and the pool, spliced after a 101."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.server import start_listener
from starmesh.runtime.message import FixedBody, Request, Response

UPGRADE = b"GET /chat HTTP/1.1\r\nHost: chat\r\nConnection: Upgrade\r\nUpgrade: echo\r\nX-Token: t\r\n\r\n"


def run(coro: Coroutine[Any, Any, None], *, uv: bool = False) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro, 30)
        for _ in range(5):
            await asyncio.sleep(0)
        leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leaked, f"tasks left running: {leaked}"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uv else None) as runner:
        runner.run(main())


class EchoUpstream:
    """Answers an upgrade with 101 and a greeting, then echoes bytes until EOF."""

    def __init__(self, status: int = 101) -> None:
        self.status = status
        self.heads: list[bytes] = []
        self.echoed = 0
        self.finished: asyncio.Event | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if self.status != 101:
                writer.write(b"HTTP/1.1 %d Nope\r\nContent-Length: 4\r\n\r\nnope" % self.status)
                await writer.drain()
                await reader.read()
                return
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nHELLO")
            while data := await reader.read(65536):
                writer.write(data)
                self.echoed += len(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if self.finished is not None:
                self.finished.set()


@asynccontextmanager
async def proxy_to(upstream: EchoUpstream, allow: bool = True) -> AsyncIterator[int]:
    upstream.finished = asyncio.Event()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = UpstreamPool()

    async def dispatch(request: Request) -> Response:
        assert request.upgrade
        if not allow:
            return Response(403, [], FixedBody(b"denied"))
        return await pool.send(address, request)

    listener = await start_listener("127.0.0.1", 0, dispatch, side="outbound")
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await listener.wait_closed()
        await pool.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("uv", [False, True], ids=["asyncio", "uvloop"])
def test_upgrade_is_spliced_byte_for_byte_with_flow_control(uv: bool) -> None:
    upstream = EchoUpstream()
    payload = bytes(range(256)) * 16384  # 4 MiB: more than any socket buffer

    async def main() -> None:
        async with proxy_to(upstream) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(UPGRADE)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"\r\nupgrade: echo\r\n" in head.lower() and b"\r\nconnection: upgrade\r\n" in head.lower()
            assert await reader.readexactly(5) == b"HELLO"

            async def send() -> None:
                for start in range(0, len(payload), 100_000):
                    writer.write(payload[start : start + 100_000])
                    await writer.drain()

            sender = asyncio.create_task(send())
            echoed = await reader.readexactly(len(payload))
            await sender
            assert echoed == payload
            writer.close()
            await writer.wait_closed()
            assert upstream.finished is not None
            await asyncio.wait_for(upstream.finished.wait(), 10)  # the tunnel closed the upstream side

    run(main(), uv=uv)
    (head,) = upstream.heads
    lower = head.lower()
    assert b"connection: upgrade\r\n" in lower and b"upgrade: echo\r\n" in lower and b"x-token: t\r\n" in lower


def test_upstream_closing_the_tunnel_closes_the_client() -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nbye")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool()

        async def dispatch(request: Request) -> Response:
            return await pool.send(address, request)

        listener = await start_listener("127.0.0.1", 0, dispatch, side="outbound")
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
        writer.write(UPGRADE)
        await reader.readuntil(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"bye"  # then EOF
        writer.close()
        await writer.wait_closed()
        listener.close()
        await listener.wait_closed()
        await pool.close()
        server.close()
        await server.wait_closed()

    run(main())


def test_a_refused_upgrade_is_answered_and_the_connection_closed() -> None:
    upstream = EchoUpstream(status=426)

    async def main() -> None:
        async with proxy_to(upstream) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(UPGRADE)
            raw = await asyncio.wait_for(reader.read(), 10)
            assert raw.startswith(b"HTTP/1.1 426 ") and raw.endswith(b"nope")
            assert b"\r\nconnection: close\r\n" in raw
            writer.close()
            await writer.wait_closed()

    run(main())


def test_a_denied_upgrade_never_reaches_the_upstream() -> None:
    upstream = EchoUpstream()

    async def main() -> None:
        async with proxy_to(upstream, allow=False) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(UPGRADE + b"early bytes that must not be forwarded")
            raw = await asyncio.wait_for(reader.read(), 10)
            assert raw.startswith(b"HTTP/1.1 403 ") and raw.endswith(b"denied")
            writer.close()
            await writer.wait_closed()

    run(main())
    assert upstream.heads == []
