"""Per-request cost of the proxy's pieces, in process: no sockets, no wrk, little noise.

    .venv/bin/python bench/proxy_parts.py            # ~10 s
    .venv/bin/python bench/proxy_parts.py --n 50000

`bench/proxy.py` measures the whole proxy under wrk; on a 2-core VM its runs vary by a
few percent, so a change worth half a microsecond per request cannot be seen there.
This script times the pieces of one `bench/proxy.py` request on their own, each in a
loop on one event loop (uvloop), best of 5:

- `reader`: the listener's RequestReader parsing wrk's request into a Request;
- `upstream`: an UpstreamConnection writing that request (to a transport that drops
  it) and parsing the app's response (nginx's head and 24-byte body) into a Response;
- `route+chain`: `RouteTable.outbound` for the bench's policy (header-match rule,
  90/10 split, timeout, retries with per-try timeout, breaker, outlier detection,
  telemetry), with a pool that answers at once: routing and every filter, no I/O;
- `response head`: encoding the response head the listener writes;
- `httptools only`: httptools parsing the same request with callbacks that only
  collect the fields, the floor under `reader`.

Together they are the per-request Python of one proxied request, less the event
loop's part (socket reads and writes, one future and task wake-up). Numbers are µs of
CPU on this machine; compare runs of this script, not these with bench/proxy.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools
import uvloop

from starmesh.bundle.canonical import decode_bundle
from starmesh.compiler.compile import compile_tree
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.connection import UpstreamConnection
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.http.reader import RequestReader
from starmesh.runtime.http.server import _SKIP
from starmesh.runtime.http.wire import encode_head, status_line
from starmesh.runtime.message import EMPTY, FixedBody, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.table import RouteTable
from starmesh.runtime.telemetry import MemoryRecorder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import POLICY, SERVICE  # noqa: E402 - the bench's policy, shared with proxy.py

__all__ = ["main", "measure"]

REQUEST = f"GET / HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n".encode()
"""What wrk sends (`-H 'Host: app'`)."""

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 24\r\nConnection: keep-alive\r\n\r\n"
    b"hello from the upstream\n"
)
"""What the bench's app (nginx) answers."""


def best(run: Callable[[int], None], n: int, repeat: int = 5) -> float:
    """µs per call of the fastest of `repeat` runs of `run(n)`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(n)
        times.append((time.perf_counter() - start) / n * 1e6)
    return min(times)


class _Owner:
    """A listener that takes requests and does nothing with them."""

    def enqueue(self, request: Request) -> None:
        pass

    def reject(self, status: int, message: str) -> None:
        raise RuntimeError(f"{status} {message}")

    def head_started(self) -> None:
        pass

    def upgraded(self, early: bytes) -> None:
        pass

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def body_reading(self, body: object) -> None: ...

    def body_closed(self, body: object) -> None: ...


class _Fields:
    """httptools callbacks that only collect the fields."""

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_message_complete(self) -> None:
        self.fields = []


class _Pool:
    """Connection owner and pool stand-in: answers every send at once."""

    def opened(self, conn: object) -> None: ...

    def lost(self, conn: object) -> None: ...

    def release(self, conn: object) -> None: ...

    def ended(self, endpoint: str) -> None: ...

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: object) -> None: ...

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        return Response(200, [("content-type", "text/plain")], FixedBody(b"x" * 24), endpoint=endpoint)


class _Transport:
    def write(self, data: bytes) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _table(app: str) -> RouteTable:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "mesh.star").write_text(POLICY)
        result = compile_tree(root)
    if not result.ok or result.data is None or result.digest is None:
        raise SystemExit(f"the bench policy does not compile: {result.findings}")
    deps = ChainDeps(
        pool=_Pool(),
        endpoints=Endpoints({SERVICE: {"v1": (app,), "v2": (app,)}}),
        state=StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="client",
    )
    return RouteTable.build(decode_bundle(result.data), result.digest, deps, app=app)


def measure(n: int) -> dict[str, float]:
    """µs per request for each piece (see the module docstring)."""
    results: dict[str, float] = {}

    reader = RequestReader(_Owner(), HttpLimits(), time.monotonic, client="127.0.0.1", source=None, forwarded_for=True)

    def read(k: int) -> None:
        feed = reader.feed
        for _ in range(k):
            feed(REQUEST)

    results["reader"] = best(read, n)

    fields = _Fields()
    parser = httptools.HttpRequestParser(fields)

    def parse_only(k: int) -> None:
        feed = parser.feed_data
        for _ in range(k):
            feed(REQUEST)

    results["httptools only"] = best(parse_only, n)

    headers = [("server", "nginx/1.22.1"), ("date", "Thu, 26 Nov 2026 10:00:00 GMT"), ("content-type", "text/plain")]

    def head(k: int) -> None:
        for _ in range(k):
            encode_head(status_line(200), headers, _SKIP, "content-length: 24\r\n\r\n")

    results["response head"] = best(head, n)

    async def in_loop() -> None:
        loop = asyncio.get_running_loop()
        request = Request(
            "GET", "/", None, [("host", SERVICE), ("x-forwarded-for", "127.0.0.1")], EMPTY, service=SERVICE, authority=SERVICE
        )
        conn = UpstreamConnection(_Pool(), "127.0.0.1:1", loop)
        conn.connection_made(_Transport())  # type: ignore[arg-type]

        def upstream(k: int) -> None:
            for _ in range(k):
                waiter = conn.exchange(request, SERVICE)
                conn.data_received(RESPONSE)
                assert isinstance(waiter, asyncio.Future) and waiter.result().status == 200

        results["upstream"] = best(upstream, n)

        table = _table("127.0.0.1:1")

        async def chain(k: int) -> None:
            outbound = table.outbound
            for _ in range(k):
                req = Request("GET", "/", None, [("host", SERVICE)], EMPTY, service=SERVICE, authority=SERVICE)
                response = await outbound(req)
                assert response.status == 200

        timings = []
        for _ in range(5):
            start = time.perf_counter()
            await chain(n)
            timings.append((time.perf_counter() - start) / n * 1e6)
        results["route+chain"] = min(timings)

    uvloop.run(in_loop())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="requests per timed run (default 100000)")
    args = parser.parse_args(argv)
    results = measure(args.n)
    order = ["reader", "upstream", "route+chain", "response head", "httptools only"]
    for name in order:
        print(f"{name:15} {results[name]:6.2f} µs")
    total = sum(results[name] for name in order[:4])
    print(f"{'sum (first 4)':15} {total:6.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
