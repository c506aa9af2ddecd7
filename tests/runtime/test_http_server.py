"""The listener (runtime/http/server.py): forwarding, keep-alive, pipelining, bodies, 100-continue.

Real sockets on 127.0.0.1 with ephemeral ports: a raw asyncio client speaks bytes to the
listener, and upstreams are raw asyncio servers or aiohttp apps in the test process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop
from aiohttp import web

from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.http.server import Dispatch, start_listener
from starmesh.runtime.http.wire import encode_head, status_line
from starmesh.runtime.message import FixedBody, Request, Response

# -- helpers -----------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, None], *, uv: bool = False) -> None:
    """Run a test coroutine, then check it left no task behind."""

    async def main() -> None:
        await asyncio.wait_for(coro, 30)
        for _ in range(5):
            await asyncio.sleep(0)
        leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leaked, f"tasks left running: {leaked}"

    if uv:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())


@asynccontextmanager
async def listener(dispatch: Dispatch, limits: HttpLimits = HttpLimits(), **kw: Any) -> AsyncIterator[int]:
    server = await start_listener("127.0.0.1", 0, dispatch, side="outbound", limits=limits, **kw)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def aiohttp_app(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def forwarding(upstream: str, limits: HttpLimits = HttpLimits()) -> AsyncIterator[tuple[int, UpstreamPool]]:
    pool = UpstreamPool(limits)

    async def dispatch(request: Request) -> Response:
        return await pool.send(upstream, request)

    try:
        async with listener(dispatch, limits) as port:
            yield port, pool
    finally:
        await pool.close()


class Conn:
    """A raw client connection: write bytes, read whole responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, *, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"repeated {name}"
                headers[name.lower()] = value.strip()
        if head_request or status in (100, 101, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        return status, headers, body

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF, nothing more)."""
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def echo_app(connections: set[Any] | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        if connections is not None:
            connections.add(request.transport)
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": [[k.lower(), v] for k, v in request.headers.items()],
                "length": length,
                "sha256": digest.hexdigest(),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def get(path: str = "/", host: str = "svc", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# -- forwarding --------------------------------------------------------------------------


@pytest.mark.parametrize("uv", [False, True], ids=["asyncio", "uvloop"])
def test_get_is_forwarded_and_the_upstream_connection_reused(uv: bool) -> None:
    async def main() -> None:
        connections: set[Any] = set()
        async with aiohttp_app(echo_app(connections)) as upstream, forwarding(upstream) as (port, pool):
            conn = await Conn.open(port)
            for i in range(3):
                conn.send(get(f"/reviews/{i}?x=1&y=2", host="reviews:9080"))
                status, headers, body = await conn.response()
                assert status == 200
                echoed = json.loads(body)
                assert echoed["path"] == f"/reviews/{i}"
                assert echoed["query"] == "x=1&y=2"
                assert ["host", "reviews:9080"] in echoed["headers"]
            assert len(connections) == 1, "keep-alive: one upstream connection for three requests"
            assert pool.idle(upstream) == 1
            await conn.close()

    run(main(), uv=uv)


def test_post_bodies_with_content_length_and_chunked_are_streamed_intact() -> None:
    big = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB

    async def main() -> None:
        async with aiohttp_app(echo_app()) as upstream, forwarding(upstream) as (port, _):
            conn = await Conn.open(port)
            conn.send(
                f"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: {len(big)}\r\n\r\n".encode() + big
            )
            status, _, body = await conn.response()
            echoed = json.loads(body)
            assert (status, echoed["length"], echoed["sha256"]) == (200, len(big), hashlib.sha256(big).hexdigest())

            conn.send(b"POST /upload HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(big), 300_000):
                piece = big[start : start + 300_000]
                conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
                await conn.writer.drain()
            conn.send(b"0\r\n\r\n")
            status, _, body = await conn.response()
            echoed = json.loads(body)
            assert (status, echoed["length"], echoed["sha256"]) == (200, len(big), hashlib.sha256(big).hexdigest())
            await conn.close()

    run(main())


def test_large_streamed_response_bodies_reach_the_client_intact() -> None:
    chunk = b"0123456789abcdef" * 4096  # 64 KiB

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)  # no Content-Length: chunked
        for _ in range(64):
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)

    async def main() -> None:
        async with aiohttp_app(app) as upstream, forwarding(upstream) as (port, pool):
            conn = await Conn.open(port)
            for _ in range(2):
                conn.send(get("/stream"))
                status, headers, body = await conn.response()
                assert status == 200 and headers["transfer-encoding"] == "chunked"
                assert body == chunk * 64
            assert pool.idle(upstream) == 1
            await conn.close()

    run(main())


def test_http10_client_gets_a_close_delimited_stream() -> None:
    async def dispatch(request: Request) -> Response:
        class Slow(FixedBody):
            def complete(self) -> None:  # type: ignore[override]
                return None

        body = Slow(b"streamed")
        body.length = None
        return Response(200, [("content-type", "text/plain")], body)

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"GET / HTTP/1.0\r\n\r\n")
            status, headers, body = await conn.response()
            assert (status, headers["connection"], body) == (200, "close", b"streamed")
            await conn.close()

    run(main())


def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    running: list[int] = []
    most = 0

    async def dispatch(request: Request) -> Response:
        nonlocal most
        index = int(request.path.strip("/"))
        running.append(index)
        most = max(most, len(running))
        await asyncio.sleep(0.002 * (10 - index))  # the first is the slowest
        running.remove(index)
        return Response(200, [], FixedBody(request.path.encode()))

    async def main() -> None:
        async with listener(dispatch, HttpLimits(max_pipelined=2)) as port:
            conn = await Conn.open(port)
            conn.send(b"".join(get(f"/{i}") for i in range(10)))
            bodies = [(await conn.response())[2] for _ in range(10)]
            assert bodies == [f"/{i}".encode() for i in range(10)]
            for i in range(3):  # and in separate writes, past the queue bound
                conn.send(get(f"/{i}"))
            assert [(await conn.response())[2] for _ in range(3)] == [b"/0", b"/1", b"/2"]
            await conn.close()

    run(main())
    assert most == 1


def test_absolute_form_targets_name_the_service() -> None:
    seen: list[Request] = []

    async def dispatch(request: Request) -> Response:
        seen.append(request)
        return Response(204, [])

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"GET http://Reviews:9080/x/y?q=1 HTTP/1.1\r\nHost: ignored\r\n\r\n")
            assert (await conn.response())[0] == 204
            await conn.close()

    run(main())
    (request,) = seen
    assert (request.service, request.authority) == ("reviews", "Reviews:9080")
    assert (request.path, request.query) == ("/x/y", "q=1")
    assert request.header("host") == "Reviews:9080"
    assert [v for k, v in request.headers if k == "host"] == ["Reviews:9080"]


def test_request_fields_from_the_head() -> None:
    seen: list[Request] = []

    async def dispatch(request: Request) -> Response:
        seen.append(request)
        return Response(200, [], FixedBody(b"ok"))

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"delete /a%20b?x HTTP/1.1\r\nHost: Ratings.default:8080\r\nX-Thing: A b\r\n\r\n")
            assert (await conn.response())[0] == 400  # lower-case methods are not HTTP
            await conn.close()
            conn = await Conn.open(port)
            conn.send(b"DELETE /a%20b?x HTTP/1.1\r\nHost: Ratings.default:8080\r\nX-Thing: A b\r\n\r\n")
            assert (await conn.response())[0] == 200
            await conn.close()

    run(main())
    (request,) = seen
    assert (request.method, request.path, request.query) == ("DELETE", "/a%20b", "x")
    assert request.service == "ratings.default"
    assert request.header("x-thing") == "A b"
    assert request.client == "127.0.0.1" and request.version == "1.1" and request.keep_alive
    assert request.source is None


def test_hop_by_hop_fields_are_dropped_both_ways_and_x_forwarded_for_appended() -> None:
    seen: list[Request] = []

    async def upstream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Public: yes\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(upstream_handler, "127.0.0.1", 0)
        upstream = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool()

        async def dispatch(request: Request) -> Response:
            seen.append(request)
            return await pool.send(upstream, request)

        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(
                b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 300\r\n"
                b"TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic Zm9v\r\nProxy-Connection: keep-alive\r\n"
                b"X-Forwarded-For: 10.0.0.1\r\nX-Kept: 1\r\n\r\n"
            )
            status, headers, body = await conn.response()
            assert (status, body) == (200, b"ok")
            assert headers.get("x-public") == "yes"
            for name in ("x-private", "keep-alive", "proxy-authenticate"):
                assert name not in headers
            await conn.close()
        await pool.close()
        server.close()
        await server.wait_closed()

    run(main())
    (request,) = seen
    names = {name for name, _ in request.headers}
    assert names == {"host", "x-forwarded-for", "x-kept"}
    assert request.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1"


def test_head_and_204_answers_have_no_body() -> None:
    async def dispatch(request: Request) -> Response:
        if request.path == "/empty":
            return Response(204, [])
        return Response(200, [("content-length", "5")], FixedBody(b"hello"))

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/empty") + get("/"))
            assert await conn.response(head_request=True) == (200, {"content-length": "5"}, b"")
            assert (await conn.response())[0] == 204
            assert (await conn.response())[2] == b"hello"
            await conn.close()

    run(main())


# -- 100-continue ------------------------------------------------------------------------


def test_expect_100_continue_is_answered_when_the_body_is_read() -> None:
    seen: list[Request] = []

    async def dispatch(request: Request) -> Response:
        seen.append(request)
        data = b""
        while chunk := await request.body.read():
            data += chunk
        return Response(200, [], FixedBody(b"got %d" % len(data)))

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            status, _, _ = await conn.response()
            assert status == 100
            conn.send(b"hello")
            status, headers, body = await conn.response()
            assert (status, body) == (200, b"got 5")
            assert "connection" not in headers
            await conn.close()

    run(main())
    assert seen[0].header("expect") is None


def test_expect_100_continue_is_never_sent_when_the_handler_answers_first() -> None:
    async def dispatch(request: Request) -> Response:
        return Response(403, [], FixedBody(b"denied"))

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            status, headers, body = await conn.response()
            assert (status, body, headers["connection"]) == (403, b"denied", "close")
            assert await conn.closed()
            await conn.close()

    run(main())


def test_an_unread_body_is_drained_before_the_close_so_nothing_is_reset() -> None:
    body = b"x" * (512 * 1024)

    async def dispatch(request: Request) -> Response:
        return Response(403, [], FixedBody(b"denied"))

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(body))

            async def upload() -> None:
                conn.send(body)
                await conn.writer.drain()
                conn.writer.write_eof()

            uploading = asyncio.create_task(upload())
            status, headers, data = await conn.response()
            assert (status, data, headers["connection"]) == (403, b"denied", "close")
            await uploading
            assert await conn.closed()  # a clean FIN: a close with unread data would be a reset
            await conn.close()

    run(main())


# -- limits and lifecycle ----------------------------------------------------------------


def test_body_over_the_limit_is_413() -> None:
    calls: list[Request] = []

    async def dispatch(request: Request) -> Response:
        calls.append(request)
        while await request.body.read():
            pass
        return Response(200, [], FixedBody(b"ok"))

    async def main() -> None:
        async with listener(dispatch, HttpLimits(max_request_body=1000)) as port:
            conn = await Conn.open(port)
            conn.send(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1001\r\n\r\n")
            status, headers, _ = await conn.response()
            assert (status, headers["connection"]) == (413, "close")
            assert await conn.closed()
            await conn.close()

            conn = await Conn.open(port)
            conn.send(b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
            await asyncio.sleep(0.01)
            conn.send(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
            conn.send(b"1\r\nx\r\n0\r\n\r\n")
            status, headers, _ = await conn.response()
            assert (status, headers["connection"]) == (413, "close")
            assert await conn.closed()
            await conn.close()

    run(main())
    assert len(calls) == 1  # the chunked one was dispatched, then its body failed


def test_idle_keep_alive_connections_are_closed() -> None:
    async def dispatch(request: Request) -> Response:
        return Response(200, [], FixedBody(b"ok"))

    async def main() -> None:
        async with listener(dispatch, HttpLimits(idle_timeout=0.2)) as port:
            conn = await Conn.open(port)
            conn.send(get())
            assert (await conn.response())[0] == 200
            assert await conn.closed()
            await conn.close()

    run(main())


def test_client_disconnect_cancels_the_handler() -> None:
    events: list[str] = []

    async def main() -> None:
        began = asyncio.Event()

        async def dispatch(request: Request) -> Response:
            began.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
            return Response(200, [])

        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(get())
            await began.wait()
            await conn.close()
            for _ in range(100):
                if events:
                    break
                await asyncio.sleep(0.01)

    run(main())
    assert events == ["cancelled"]


def test_handler_errors_become_answers() -> None:
    async def dispatch(request: Request) -> Response:
        raise RuntimeError("boom")

    async def main() -> None:
        async with listener(dispatch) as port:
            conn = await Conn.open(port)
            conn.send(get())
            status, _, body = await conn.response()
            assert status == 500 and b"internal" in body
            await conn.close()

    run(main())


def test_upstream_refused_is_503_upstream_unavailable() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = f"127.0.0.1:{probe.sockets[0].getsockname()[1]}"
        probe.close()
        await probe.wait_closed()
        async with forwarding(dead) as (port, _):
            conn = await Conn.open(port)
            conn.send(get())
            status, headers, _ = await conn.response()
            assert (status, headers["x-starmesh-error"]) == (503, "upstream-unavailable")
            await conn.close()

    run(main())


def test_peer_identity_is_the_inbound_source() -> None:
    seen: list[Request] = []

    async def dispatch(request: Request) -> Response:
        seen.append(request)
        return Response(204, [])

    async def main() -> None:
        server = await start_listener(
            "127.0.0.1", 0, dispatch, side="inbound", peer_identity=lambda transport: "productpage"
        )
        port = server.sockets[0].getsockname()[1]
        conn = await Conn.open(port)
        conn.send(get(extra="X-Starmesh-Source: forged\r\n"))
        assert (await conn.response())[0] == 204
        await conn.close()
        server.close()
        await server.wait_closed()

    run(main())
    assert seen[0].source == "productpage"


@pytest.mark.parametrize("count", [0, 3, 40])
def test_encode_head_writes_every_field_not_skipped_in_order(count: int) -> None:
    headers = [(f"x-{i}", f"v{i}") for i in range(count)] + [("connection", "close"), ("x-name", "caf\u00e9")]
    head = encode_head(status_line(200), headers, frozenset({"connection"}), "content-length: 0\r\n\r\n")
    fields = "".join(f"x-{i}: v{i}\r\n" for i in range(count))
    assert head == f"HTTP/1.1 200 OK\r\n{fields}x-name: caf\u00e9\r\ncontent-length: 0\r\n\r\n".encode("latin-1")
    # a value outside latin-1 (set by policy) goes out as UTF-8
    assert encode_head("GET / HTTP/1.1\r\n", [("x-v", "\u2713")] * (count + 1), frozenset(), "\r\n").endswith(
        "x-v: \u2713\r\n\r\n".encode()
    )
