"""What the four Bookinfo apps share: command line, start-up, and calls through the sidecar.

Every app is one process next to one sidecar proxy (`starmesh up` starts both):

    client ──► sidecar inbound ──► app (--listen)
                                    │  GET http://<outbound>/ratings/0   Host: ratings
                                    ▼
                          sidecar outbound (--outbound) ──► the mesh picks a ratings version

The app never learns where other services run: it sends plain HTTP to its sidecar's
outbound listener and names the service in the `Host` header. Routing, retries, faults
and authorization are the mesh's business; the app only passes on the headers the rules
read (`end-user`), the one that ties a page view together (`x-request-id`) and the
W3C trace context (`traceparent`, `tracestate`), so a page view is one trace.

    python3 apps/<app>.py --service S --version V --listen 127.0.0.1:PORT --outbound 127.0.0.1:PORT2

prints exactly one line, `listening HOST:PORT`, once it accepts connections (port 0
picks a free port), and exits 0 on SIGTERM or SIGINT. Every response carries
`x-app-name: <service>-<version>`, so a caller can see who answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

__all__ = ["AppArgs", "Downstream", "Reply", "describe_status", "parse_args", "run"]

FORWARDED_HEADERS = ("end-user", "x-request-id", "traceparent", "tracestate")
"""Request headers an app passes on to the services it calls."""
MAX_REPLY_BYTES = 256 * 1024
"""The largest answer an app reads from another service."""
MAX_CONNECTIONS = 64
"""Pooled connections to the sidecar's outbound listener."""
SHUTDOWN_GRACE = 2.0
"""Seconds in-flight requests get to finish after SIGTERM/SIGINT."""


@dataclass(frozen=True)
class AppArgs:
    """The command line of one app instance."""

    service: str
    version: str
    host: str
    port: int
    outbound: str | None
    """HOST:PORT of the sidecar's outbound listener; None when the app calls nobody."""

    @property
    def app_name(self) -> str:
        """What `x-app-name` says: `<service>-<version>`."""
        return f"{self.service}-{self.version}"


def _split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9080 or [::1]:0)")
    return host, int(port)


def parse_args(
    description: str,
    service: str,
    versions: Sequence[str],
    needs_outbound: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> AppArgs:
    """Parse and check the command line; exit 2 with a message when it is wrong.

    `service` is the one service this script is; `versions` the versions it can be;
    the versions in `needs_outbound` call other services and so need `--outbound`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default=service, help=f"the service name (this script is {service!r})")
    parser.add_argument("--version", required=True, choices=list(versions), help="which version to be")
    parser.add_argument("--listen", type=_split_address, required=True, metavar="HOST:PORT", help="port 0 picks one")
    parser.add_argument("--outbound", type=_split_address, metavar="HOST:PORT", help="the sidecar's outbound listener")
    args = parser.parse_args(argv)
    if args.service != service:
        parser.error(f"this script is the {service!r} app, not {args.service!r}: start apps/{args.service}.py instead")
    if args.version in needs_outbound and args.outbound is None:
        parser.error(f"{service} {args.version} calls other services through its sidecar: give --outbound HOST:PORT")
    outbound = None if args.outbound is None else _join_address(*args.outbound)
    return AppArgs(service, args.version, args.listen[0], args.listen[1], outbound)


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(app: web.Application, args: AppArgs) -> None:
    """Serve `app` on `--listen` until SIGTERM/SIGINT, then exit 0."""

    async def name_the_app(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-app-name"] = args.app_name

    app.on_response_prepare.append(name_the_app)
    try:
        asyncio.run(_serve(app, args))
    except KeyboardInterrupt:  # SIGINT before the handlers were installed
        pass
    except OSError as exc:
        sys.exit(f"{args.app_name}: cannot listen on {_join_address(args.host, args.port)}: {exc.strerror or exc}")


async def _serve(app: web.Application, args: AppArgs) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        host, port = runner.addresses[0][:2]
        print(f"listening {_join_address(host, port)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- calling other services


@dataclass(frozen=True)
class Reply:
    """What a call to another service gave: its JSON object, or why there is none."""

    data: dict[str, object] | None
    error: str | None
    """`<status> <reason>` (e.g. `503 fault`, `403 denied`), `timeout after 3s`, or
    `cannot reach the sidecar at HOST:PORT (...)`; None when the call succeeded."""


def describe_status(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """`<status> <why>`: the proxy's `x-starmesh-error` word, else the body's first line."""
    reason = headers.get("x-starmesh-error", "")
    if not reason:
        lines = body.decode("utf-8", "replace").strip().splitlines()
        reason = lines[0][:200] if lines else ""
    return f"{status} {reason}".strip()


class Downstream:
    """One pooled HTTP client to the sidecar's outbound listener, with a timeout on every call.

    Register it with `app.cleanup_ctx.append(downstream.session)`; then
    `await downstream.get_json("ratings", "/ratings/0", request)` calls ratings with
    `Host: ratings`, passing on the incoming request's FORWARDED_HEADERS.
    A failure of any kind comes back as a `Reply` with `error` set, never as an exception.
    """

    def __init__(self, outbound: str, timeout: float) -> None:
        self._outbound = outbound
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def session(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the client session lives as long as the app."""
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            yield
            self._session = None

    async def get_json(self, service: str, path: str, incoming: web.Request, end_user: str | None = None) -> Reply:
        """GET `path` of `service`; `end_user` overrides the incoming `end-user` header."""
        assert self._session is not None, "Downstream.session must be in app.cleanup_ctx"
        headers = {"Host": service, "Accept": "application/json"}
        headers.update((name, incoming.headers[name]) for name in FORWARDED_HEADERS if name in incoming.headers)
        if end_user:
            headers["end-user"] = end_user
        try:
            async with self._session.get(f"http://{self._outbound}{path}", headers=headers) as response:
                body = await _read_bounded(response)
                if response.status != 200:
                    return Reply(None, describe_status(response.status, response.headers, body))
                data = json.loads(body)
        except TimeoutError:
            return Reply(None, f"timeout after {self._timeout:g}s")
        except aiohttp.ClientConnectorError as exc:
            return Reply(None, f"cannot reach the sidecar at {self._outbound} ({exc.os_error.strerror or exc})")
        except aiohttp.ClientError as exc:
            return Reply(None, f"{service} failed: {type(exc).__name__} {exc}".strip())
        except ValueError:
            return Reply(None, f"200 {service} did not answer JSON")
        if not isinstance(data, dict):
            return Reply(None, f"200 {service} answered JSON that is not an object")
        return Reply(data, None)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > MAX_REPLY_BYTES:
            raise aiohttp.ClientPayloadError(f"answer larger than {MAX_REPLY_BYTES} bytes")
    return bytes(body)
