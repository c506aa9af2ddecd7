"""Bad input at the listener: each gets a clear answer, the connection is closed, nothing is dispatched.

And the framing the upstream sees is always the proxy's own (no request smuggling).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.http.reader import RequestReader
from starmesh.runtime.http.server import Dispatch, start_listener
from starmesh.runtime.message import FixedBody, Request, Response


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro, 30)
        for _ in range(5):
            await asyncio.sleep(0)
        leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leaked, f"tasks left running: {leaked}"

    asyncio.run(main())


@asynccontextmanager
async def listener(dispatch: Dispatch, limits: HttpLimits = HttpLimits()) -> AsyncIterator[int]:
    server = await start_listener("127.0.0.1", 0, dispatch, side="outbound", limits=limits)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def exchange(port: int, data: bytes, *, pause_after: bool = False) -> bytes:
    """Send `data`, then read everything until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def statuses(raw: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


BAD_INPUT = {
    "garbage request line": (b"GARBAGE\r\n\r\n", 400),
    "bad version": (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 400),
    "missing version": (b"GET /\r\nHost: a\r\n\r\n", 400),
    "lower-case method": (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "bare LF": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "missing Host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two Hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "CL and TE": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    ),
    "TE and CL": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate differing CL": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "duplicate equal CL": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "CL list": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    "negative CL": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "TE gzip": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    "TE gzip, chunked": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    "TE twice": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "TE xchunked": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    "TE in HTTP/1.0": (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bad chunk size": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "CONNECT": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    "absolute https": (b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "upgrade with a body": (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_answered_and_the_connection_closed(name: str) -> None:
    data, expected = BAD_INPUT[name]
    calls: list[Request] = []

    async def dispatch(request: Request) -> Response:
        calls.append(request)
        return Response(200, [], FixedBody(b"ok"))

    async def main() -> None:
        async with listener(dispatch) as port:
            raw = await exchange(port, data)
        assert statuses(raw) == [expected], raw
        assert b"\r\nconnection: close\r\n" in raw
        assert raw.endswith(b"\n") and raw.count(b"\r\n\r\n") == 1  # one answer, one line of text

    run(main())
    assert calls == []


def test_oversize_headers_are_431() -> None:
    limits = HttpLimits(max_header_bytes=1024)

    async def dispatch(request: Request) -> Response:
        raise AssertionError("never dispatched")

    async def main() -> None:
        async with listener(dispatch, limits) as port:
            # one big field, terminated
            raw = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
            assert statuses(raw) == [431]
            # one big field that never ends (the parser would keep buffering it)
            raw = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000)
            assert statuses(raw) == [431]
            # a long request line
            raw = await exchange(port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            assert statuses(raw) == [431]

    run(main())


def test_too_many_headers_are_431() -> None:
    limits = HttpLimits(max_headers=10)

    async def dispatch(request: Request) -> Response:
        return Response(200, [], FixedBody(b"ok"))

    async def main() -> None:
        async with listener(dispatch, limits) as port:
            fields = b"".join(b"X-%d: v\r\n" % i for i in range(10))
            raw = await exchange(port, b"GET / HTTP/1.1\r\n" + fields + b"Host: a\r\nConnection: close\r\n\r\n")
            assert statuses(raw) == [431]
            fields = b"".join(b"X-%d: v\r\n" % i for i in range(8))
            raw = await exchange(port, b"GET / HTTP/1.1\r\n" + fields + b"Host: a\r\nConnection: close\r\n\r\n")
            assert statuses(raw) == [200]

    run(main())


def test_slow_headers_are_408() -> None:
    limits = HttpLimits(header_timeout=0.3)

    async def dispatch(request: Request) -> Response:
        return Response(200, [], FixedBody(b"ok"))

    async def main() -> None:
        async with listener(dispatch, limits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and nothing more
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
            assert statuses(raw) == [408]
            assert raw.endswith(b"\n")

    run(main())


def test_a_bad_request_after_good_ones_is_answered_after_them() -> None:
    async def dispatch(request: Request) -> Response:
        await asyncio.sleep(0.01)
        return Response(200, [], FixedBody(request.path.encode()))

    async def main() -> None:
        async with listener(dispatch) as port:
            raw = await exchange(
                port,
                b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            )
            assert statuses(raw) == [200, 200, 400]
            assert raw.index(b"/1") < raw.index(b"/2")

    run(main())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_upstream_sees_the_proxy_framing_only(chunked: bool) -> None:
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        lower = head.lower()
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            bodies.append(await reader.readexactly(length))
        else:
            data = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data += await reader.readexactly(size)
                await reader.readexactly(2)
            bodies.append(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool()

        async def dispatch(request: Request) -> Response:
            return await pool.send(address, request)

        async with listener(dispatch) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if chunked:
                writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)  # the rest arrives later: a streamed body
                writer.write(b"6\r\n world\r\n0\r\n\r\n")
            else:
                writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b" world")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
        await pool.close()
        server.close()
        await server.wait_closed()

    run(main())
    (head,) = heads
    lower = head.lower()
    assert bodies == [b"hello world"]
    if chunked:
        assert lower.count(b"transfer-encoding: chunked") == 1 and b"content-length" not in lower
    else:
        assert lower.count(b"content-length: 11") == 1 and b"transfer-encoding" not in lower


class _Owner:
    """A RequestReader owner that records what it is handed."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.rejected: list[int] = []

    def enqueue(self, request: Request) -> None:
        self.requests.append(request)

    def reject(self, status: int, message: str) -> None:
        self.rejected.append(status)

    def head_started(self) -> None: ...

    def upgraded(self, early: bytes) -> None: ...

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def body_reading(self, body: object) -> None: ...

    def body_closed(self, body: object) -> None: ...


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "two-reads"])
def test_the_head_size_limit_is_exact_however_the_head_arrives(split: bool) -> None:
    # Counted as the reader does: the target, plus name, value and 4 per field (the
    # head's bytes, 72, are more: the reader counts exactly when they exceed the limit).
    head = b"GET /abc HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 40 + b"\r\n\r\n"
    size = len("/abc") + (4 + 1 + 4) + (5 + 40 + 4)
    for limit, accepted in ((size, True), (size - 1, False)):
        owner = _Owner()
        limits = HttpLimits(max_header_bytes=limit)
        reader = RequestReader(owner, limits, lambda: 0.0, client="", source=None, forwarded_for=False)
        if split:
            reader.feed(head[:30])
            reader.feed(head[30:])
        else:
            reader.feed(head)
        assert (len(owner.requests), owner.rejected) == ((1, []) if accepted else (0, [431]))
