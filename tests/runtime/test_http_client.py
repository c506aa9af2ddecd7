"""The upstream pool (runtime/http/client.py) against real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from starmesh.runtime.http.body import StreamBody
from starmesh.runtime.http.client import UpstreamError, UpstreamPool
from starmesh.runtime.http.connection import UpstreamConnection
from starmesh.runtime.http.errors import HttpError
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.message import EMPTY, Body, FixedBody, Request, Response

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro, 30)
        for _ in range(5):
            await asyncio.sleep(0)
        leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leaked, f"tasks left running: {leaked}"

    asyncio.run(main())


class Upstream:
    """A raw asyncio upstream that counts connections; `handler` serves each one."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()
            self._tasks.discard(task)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        return head, await reader.readexactly(int(lower.split(b"content-length:")[1].split(b"\r\n")[0]))
    if b"transfer-encoding: chunked" in lower:
        data = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return head, data
            data += await reader.readexactly(size)
            await reader.readexactly(2)
    return head, b""


def ok_server(body: bytes = b"ok", extra: bytes = b"") -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    return handler


def request(
    path: str = "/", method: str = "GET", body: Body = EMPTY, headers: list[tuple[str, str]] | None = None
) -> Request:
    fields = list(headers or [("host", "svc")])
    return Request(method, path, None, fields, body, service="svc", authority="svc")


async def read_all(body: Body) -> bytes:
    data = b""
    while chunk := await body.read():
        data += chunk
    return data


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


class Source:
    """A BodySource for request bodies the test feeds itself."""

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def body_reading(self, body: StreamBody) -> None: ...
    def body_closed(self, body: StreamBody) -> None: ...


# -- keep-alive --------------------------------------------------------------------------


def test_connections_are_reused_and_idle_ones_bounded() -> None:
    async def main() -> None:
        async with Upstream(ok_server()).running() as upstream:
            pool = UpstreamPool(HttpLimits(upstream_max_idle_per_endpoint=2))
            for _ in range(5):
                response = await pool.send(upstream.address, request())
                assert (response.status, await read_all(response.body)) == (200, b"ok")
            assert upstream.connections == 1
            responses = await asyncio.gather(*(pool.send(upstream.address, request()) for _ in range(4)))
            assert [r.status for r in responses] == [200] * 4
            assert upstream.connections == 4
            assert pool.idle(upstream.address) == 2, "idle connections are bounded per endpoint"
            assert pool.active(upstream.address) == 0
            await until(lambda: upstream.closed == 2)
            await pool.close()
            assert pool.connections() == 0

    run(main())


def test_request_head_host_and_framing() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            headers = [("host", "client-said"), ("content-length", "99"), ("connection", "close"), ("x-a", "1")]
            await pool.send(upstream.address, request("/p?q", headers=headers), host="reviews-shadow")
            await pool.send(upstream.address, request("/post", "POST", FixedBody(b"abc")))
            await pool.close()

    run(main())
    (head1, _), (head2, body2) = seen
    assert head1 == b"GET /p?q HTTP/1.1\r\nhost: reviews-shadow\r\nx-a: 1\r\n\r\n"
    assert head2 == b"POST /post HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\n" and body2 == b"abc"


def test_streamed_request_bodies_are_sent_chunked() -> None:
    digest: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        assert b"transfer-encoding: chunked" in head
        digest.append(hashlib.sha256(body).hexdigest())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    payload = b"x" * 3_000_000

    async def main() -> None:
        body = StreamBody(None, Source())

        async def produce() -> None:
            for start in range(0, len(payload), 100_000):
                body.feed(payload[start : start + 100_000])
                await asyncio.sleep(0)
            body.finish()

        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            producer = asyncio.create_task(produce())
            response = await pool.send(upstream.address, request("/", "POST", body))
            await producer
            assert response.status == 200
            await pool.close()

    run(main())
    assert digest == [hashlib.sha256(payload).hexdigest()]


def test_large_and_chunked_response_bodies_stream_then_the_connection_is_reused() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/chunked" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for start in range(0, len(big), 65536):
                    writer.write(b"10000\r\n" + big[start : start + 65536] + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
                writer.write(big)
            await writer.drain()

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            for path in ("/chunked", "/length", "/chunked"):
                response = await pool.send(upstream.address, request(path))
                assert response.body.length == (None if path == "/chunked" else len(big))
                assert pool.active(upstream.address) == 1  # until the body is read
                assert await read_all(response.body) == big
                assert pool.active(upstream.address) == 0
            assert upstream.connections == 1
            await pool.close()

    run(main())


def test_closing_a_body_early_closes_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            await writer.drain()

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            response = await pool.send(upstream.address, request())
            assert len(await response.body.read()) > 0
            response.body.close()
            await until(lambda: pool.connections() == 0)
            assert pool.idle(upstream.address) == 0 and pool.active(upstream.address) == 0
            await until(lambda: upstream.closed == 1)
            await pool.close()

    run(main())


def test_head_interim_and_close_delimited_responses() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n")
            elif b"/interim" in head:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
            else:
                writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
                await writer.drain()
                return
            await writer.drain()

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            response = await pool.send(upstream.address, request(method="HEAD"))
            assert (response.status, response.body.complete()) == (200, b"")
            assert ("content-length", "12345") in response.headers
            response = await pool.send(upstream.address, request("/interim"))
            assert (response.status, await read_all(response.body)) == (201, b"done")
            assert ("link", "</a>") not in response.headers
            response = await pool.send(upstream.address, request("/eof"))
            data = await read_all(response.body)
            assert (response.status, response.body.length, data) == (200, None, b"until the end")
            await pool.close()

    run(main())


# -- failures ----------------------------------------------------------------------------


def test_refused_connection_is_upstream_unavailable_not_sent() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        address = f"127.0.0.1:{probe.sockets[0].getsockname()[1]}"
        probe.close()
        await probe.wait_closed()
        pool = UpstreamPool()
        with pytest.raises(UpstreamError) as caught:
            await pool.send(address, request())
        assert (caught.value.reason, caught.value.sent) == ("upstream-unavailable", False)
        assert address in str(caught.value)
        assert isinstance(caught.value, HttpError)
        assert pool.active(address) == 0
        with pytest.raises(UpstreamError, match="invalid endpoint"):
            await pool.send("nohost", request())
        await pool.close()

    run(main())


@pytest.mark.parametrize("when", ["before-head", "mid-head", "abort", "garbage"])
def test_reset_before_a_complete_head_is_upstream_reset_sent(when: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if when == "mid-head":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await writer.drain()
        elif when == "abort":
            writer.transport.abort()
        elif when == "garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            await reader.read()

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            with pytest.raises(UpstreamError) as caught:
                await pool.send(upstream.address, request())
            assert (caught.value.reason, caught.value.sent) == ("upstream-reset", True)
            assert pool.active(upstream.address) == 0 and pool.idle(upstream.address) == 0
            await until(lambda: pool.connections() == 0)
            await pool.close()

    run(main())


def test_reset_mid_body_fails_the_body_read() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            response = await pool.send(upstream.address, request())
            with pytest.raises(UpstreamError) as caught:
                await read_all(response.body)
            assert caught.value.reason == "upstream-reset"
            assert pool.active(upstream.address) == 0
            await pool.close()

    run(main())


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the second request on this connection: close, answer nothing

    async def main() -> None:
        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            for _ in range(2):
                response = await pool.send(upstream.address, request("/", "POST", FixedBody(b"replayable")))
                assert (response.status, await read_all(response.body)) == (200, b"ok")
            assert upstream.connections == 2
            await pool.close()

    run(main())


def test_cancelled_send_closes_its_connection_and_leaks_nothing() -> None:
    async def main() -> None:
        got = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            got.set()
            await reader.read()  # until the proxy closes the connection

        async with Upstream(handler).running() as upstream:
            pool = UpstreamPool()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await pool.send(upstream.address, request())
            assert got.is_set()
            assert pool.active(upstream.address) == 0 and pool.idle(upstream.address) == 0
            await until(lambda: pool.connections() == 0)
            await until(lambda: upstream.closed == 1)
            # cancelled while streaming a request body: same outcome
            got.clear()
            body = StreamBody(None, Source())
            body.feed(b"some")
            task = asyncio.create_task(pool.send(upstream.address, request("/", "POST", body)))
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: pool.connections() == 0 and upstream.closed == 2)
            assert pool.active(upstream.address) == 0
            await pool.close()

    run(main())


def test_retain_closes_idle_connections_to_removed_endpoints() -> None:
    async def main() -> None:
        async with Upstream(ok_server()).running() as a, Upstream(ok_server()).running() as b:
            pool = UpstreamPool()
            for upstream in (a, b):
                await read_all((await pool.send(upstream.address, request())).body)
            assert pool.idle(a.address) == pool.idle(b.address) == 1
            pool.retain([b.address])
            assert pool.idle(a.address) == 0 and pool.idle(b.address) == 1
            await until(lambda: a.closed == 1)
            assert b.closed == 0
            await pool.close()

    run(main())


# -- parsing, in process -----------------------------------------------------------------


class _Owner:
    """A ConnectionOwner that records what its connection reports."""

    def __init__(self) -> None:
        self.released = 0

    def opened(self, conn: UpstreamConnection) -> None: ...
    def lost(self, conn: UpstreamConnection) -> None: ...
    def ended(self, endpoint: str) -> None: ...

    def release(self, conn: UpstreamConnection) -> None:
        self.released += 1


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_response_fields_version_and_framing_as_parsed() -> None:
    async def main() -> None:
        owner = _Owner()
        conn = UpstreamConnection(owner, "127.0.0.1:1", asyncio.get_running_loop())
        conn.connection_made(_Transport())  # type: ignore[arg-type]

        async def exchange(*chunks: bytes) -> Response:
            waiter = conn.exchange(request(), "svc")
            for chunk in chunks:
                conn.data_received(chunk)
            return await waiter

        ok = b"Content-Length: 2\r\n\r\nok"
        response = await exchange(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + ok)
        assert (response.version, response.body.complete()) == ("1.1", b"ok")
        assert response.headers == [("x-a", "1"), ("content-length", "2")]
        assert isinstance(response.body, FixedBody) and response.endpoint == "127.0.0.1:1"
        response = await exchange(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n" + ok)
        assert response.version == "1.0"
        response = await exchange(b"HTT", b"P/1.1 200 OK\r\n" + ok)  # the version line split
        assert response.version == "1.1"
        response = await exchange(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nConnection: keep-alive\r\n" + ok)
        assert (response.status, response.version) == (200, "1.0")
        fields = b"Connection: x-drop, keep-alive\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\nX-Keep: 2\r\n"
        response = await exchange(b"HTTP/1.1 200 OK\r\n" + fields + ok)
        assert response.headers == [("x-keep", "2"), ("content-length", "2")]
        # The head alone: the body streams, its length from Content-Length or none when chunked.
        response = await exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        assert isinstance(response.body, StreamBody) and response.body.length == 5
        conn.data_received(b"cde")
        assert await read_all(response.body) == b"abcde"
        response = await exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert isinstance(response.body, StreamBody) and response.body.length is None
        conn.data_received(b"3\r\nxyz\r\n0\r\n\r\n")
        assert await read_all(response.body) == b"xyz"
        # Connection may name Content-Length: dropped from the fields, still the framing.
        response = await exchange(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n")
        assert response.headers == [] and isinstance(response.body, StreamBody) and response.body.length == 3
        conn.data_received(b"abc")
        assert await read_all(response.body) == b"abc"
        assert owner.released == 8
        conn.close()

    run(main())
