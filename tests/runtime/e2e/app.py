"""A small HTTP app for end-to-end tests, run as a real process.

    python tests/runtime/e2e/app.py --port 0 --name v1 [--host 127.0.0.1] [--status 503]

It prints one line, `listening on HOST:PORT`, once it accepts connections, and
serves until SIGTERM/SIGINT. Every answer carries `x-app-name: <name>` so a test can
tell which app (version) answered.

Behaviour is chosen per request by the path:

    /status/<code>   answer <code> with a short text body
    /delay/<ms>      wait <ms> milliseconds, then answer 200
    /reset           read the whole request body, then reset the connection (TCP RST)
                     without answering
    /echo            answer 200 with JSON {"name", "method", "path", "query",
                     "headers": [[name, value], ...], "body"} describing the request
    /ws              a WebSocket that answers each text message with "<name>: <message>"
    anything else    answer 200 with JSON {"name", "method", "path"}

or by request headers, which apply to any path (header wins over path default):

    x-app-delay-ms: <ms>     wait before answering
    x-app-status: <code>     answer with this status

`--status CODE` makes every non-control request answer CODE (a failing endpoint);
it can be changed at run time through `/__config`.

Control endpoints (not counted):

    GET    /__stats    {"name", "total", "requests": {"METHOD /path": n}, "hosts": {host: n}}
    DELETE /__stats    reset the counters
    POST   /__config   JSON {"status": int | null}: force (or stop forcing) a status

A request is counted when its headers arrive, before any delay or reset, so a test
can count the tries a proxy made even when it cut them off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
from collections import Counter

from aiohttp import WSMsgType, web

__all__ = ["AppState", "make_app", "main"]


class AppState:
    """Counters and run-time configuration of one test app."""

    def __init__(self, name: str, status: int | None) -> None:
        self.name = name
        self.status = status
        self.requests: Counter[str] = Counter()
        self.hosts: Counter[str] = Counter()
        self.total = 0

    def count(self, request: web.Request) -> None:
        self.total += 1
        self.requests[f"{request.method} {request.path}"] += 1
        self.hosts[request.headers.get("Host", "")] += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "total": self.total,
            "requests": dict(self.requests),
            "hosts": dict(self.hosts),
        }

    def reset(self) -> None:
        self.requests.clear()
        self.hosts.clear()
        self.total = 0


def _reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), answering nothing."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def make_app(state: AppState) -> web.Application:
    """The aiohttp application: control endpoints first, then the catch-all behaviour."""

    async def stats(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            state.reset()
        return web.json_response(state.snapshot())

    async def config(request: web.Request) -> web.Response:
        data = await request.json()
        status = data.get("status")
        state.status = int(status) if status is not None else None
        return web.json_response({"name": state.name, "status": state.status})

    async def behave(request: web.Request) -> web.StreamResponse:
        state.count(request)
        body = await request.read()
        path = request.path
        headers = {"x-app-name": state.name}

        delay_ms = request.headers.get("x-app-delay-ms")
        if delay_ms is None and path.startswith("/delay/"):
            delay_ms = path.removeprefix("/delay/")
        if delay_ms is not None:
            await asyncio.sleep(int(delay_ms) / 1000)

        if path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await ws.send_str(f"{state.name}: {message.data}")
            return ws

        if path == "/reset":
            _reset_connection(request)
            # Nothing can be written any more; stop the handler without a response.
            raise asyncio.CancelledError

        status_text = request.headers.get("x-app-status")
        if status_text is None and path.startswith("/status/"):
            status_text = path.removeprefix("/status/")
        status = int(status_text) if status_text is not None else state.status
        if status is not None and status != 200:
            return web.Response(status=status, text=f"{state.name} says {status}\n", headers=headers)

        if path == "/echo":
            return web.json_response(
                {
                    "name": state.name,
                    "method": request.method,
                    "path": path,
                    "query": request.query_string,
                    "headers": [[k, v] for k, v in request.headers.items()],
                    "body": body.decode("latin-1"),
                },
                headers=headers,
            )
        return web.json_response({"name": state.name, "method": request.method, "path": path}, headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/__stats", stats)
    app.router.add_route("DELETE", "/__stats", stats)
    app.router.add_route("POST", "/__config", config)
    app.router.add_route("*", "/{tail:.*}", behave)
    return app


async def _serve(host: str, port: int, state: AppState) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # In-flight requests (a test may leave /delay requests behind) get a short grace on stop.
    runner = web.AppRunner(make_app(state), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=512)
    await site.start()
    bound = runner.addresses[0]
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", required=True, help="reported in x-app-name and /__stats")
    parser.add_argument("--status", type=int, default=None, help="answer every request with this status")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port, AppState(args.name, args.status)))


if __name__ == "__main__":
    main()
