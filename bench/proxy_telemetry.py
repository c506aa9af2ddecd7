"""`bench/proxy.py --telemetry`: what traces and access logs cost one starmesh hop (issue 7).

Two more one-hop targets join proxy.py's interleaved run, next to its `starmesh`; all
three are `starmesh proxy --bundle` with proxy.py's POLICY, only the telemetry settings
changed:

  starmesh-telemetry-off  --access-log off, mesh(tracing = tracing(sample_percent = 0)),
                          no OTLP endpoint: the floor. The per-request metric counters
                          cannot be turned off, and every request still carries a
                          `traceparent` onward (unsampled: a header scan and a random id)
  starmesh                proxy.py's own target, the defaults: POLICY sets neither tracing
                          nor access_log, so sample_percent 1 (and no endpoint, so no
                          span is ever made) and the access log on, STATE_DIR/access.log,
                          capped at 100 lines/s (a token-bucket check per request)
  starmesh-traced         the worst case: sample_percent 100 and --otlp-endpoint at a local
                          sink, so every request is a span, batched and exported over
                          OTLP/HTTP, and metrics are pushed there too; access_log with
                          max_lines_per_second 1,000,000 to a file: every request a line

The sink (`python bench/proxy_telemetry.py --sink`) is aiohttp on 127.0.0.1, pinned with
the servers: 200 to POST /v1/traces and /v1/metrics, the body read and discarded, and
the count of posts and bytes (and its pid) at GET /counts. It stands in for a
collector; its CPU is not counted in the traced target's. After the runs each
telemetry target's admin /metrics gives its requests and dropped access-log lines, so
the report says how many spans and lines were actually produced, not just configured.

`python bench/proxy_telemetry.py --pieces` times the pieces on their own, in process: an
unsampled request's traceparent, a sampled request's SDK span, its OTLP encoding, and an
access-log line's rendering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VARIANTS", "Variant", "cost_table", "counters", "pieces", "policy", "proxy_args", "serve_sink", "sink_command"]

OFF = "starmesh-telemetry-off"
DEFAULT = "starmesh"
TRACED = "starmesh-traced"

_MESH_CALL = 'mesh(name = "bench", mtls = "disable")'


@dataclass(frozen=True)
class Variant:
    """One telemetry setting of the one-hop proxy: its policy's tracing and access_log, its flags."""

    name: str
    sample_percent: int
    max_lines_per_second: int | None
    """None: the mesh's default access_log()."""
    access_log: str
    """"off", or "file" (STATE_DIR/access.log, named explicitly)."""
    otlp: bool
    """--otlp-endpoint at the sink."""


VARIANTS = (
    Variant(OFF, sample_percent=0, max_lines_per_second=None, access_log="off", otlp=False),
    Variant(TRACED, sample_percent=100, max_lines_per_second=1_000_000, access_log="file", otlp=True),
)


def policy(base: str, variant: Variant) -> str:
    """`base` (proxy.py's POLICY) with the variant's tracing and access_log in its mesh() call."""
    if _MESH_CALL not in base:
        raise ValueError(f"the bench policy has no {_MESH_CALL!r} to add telemetry settings to")
    settings = [f"tracing = tracing(sample_percent = {variant.sample_percent})"]
    if variant.max_lines_per_second is not None:
        settings.append(f"access_log = access_log(enabled = True, max_lines_per_second = {variant.max_lines_per_second})")
    return base.replace(_MESH_CALL, f"{_MESH_CALL[:-1]}, {', '.join(settings)})")


def proxy_args(variant: Variant, state: Path, sink: str) -> list[str]:
    """The `starmesh proxy` flags for the variant; `sink` is the OTLP sink's host:port."""
    args = ["--access-log", "off" if variant.access_log == "off" else str(state / "access.log")]
    if variant.otlp:
        args += ["--otlp-endpoint", f"http://{sink}"]
    return args


def sink_command() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--sink"]


# --- after the runs ----------------------------------------------------------------------

_REQUESTS = re.compile(r'^starmesh_requests_total\{[^}]*direction="outbound"[^}]*\} ([0-9.e+]+)$', re.MULTILINE)
_DROPPED = re.compile(r"^starmesh_access_log_dropped_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.MULTILINE)


def counters(admin: str, sink: str | None = None) -> Callable[[], dict[str, object]]:
    """What to read after the runs: the proxy's outbound requests and dropped access-log
    lines (its /metrics) and, with `sink`, what the sink received."""

    def read() -> dict[str, object]:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as answer:
            text = answer.read(1 << 22).decode()
        found: dict[str, object] = {"requests_total": int(sum(float(v) for v in _REQUESTS.findall(text)))}
        dropped = _DROPPED.search(text)
        found["access_log_dropped_total"] = int(float(dropped[1])) if dropped else None
        if sink is not None:
            with urllib.request.urlopen(f"http://{sink}/counts", timeout=10) as answer:
                found["sink"] = json.loads(answer.read())
        return found

    return read


def cost_table(summary: dict[str, dict[str, object]], concurrencies: list[int]) -> list[str]:
    """The three telemetry targets against starmesh-telemetry-off, as Markdown, then what
    each produced (lines written, spans exported)."""
    low, high = min(concurrencies), max(concurrencies)
    floor = summary.get(OFF, {})
    if not floor or "unavailable" in floor:
        return [f"telemetry cost: not measured ({OFF} unavailable)"]
    lines = [
        f"| target | req/s c{high} | × off | added p50 c{low} µs | vs off | p99 c{low} µs | vs off "
        f"| CPU µs/req c{high} | vs off | CPU µs/req c{low} | idle RSS MB | RSS after MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def number(row: dict[str, object], key: str) -> float | None:
        value = row.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    for name in (OFF, DEFAULT, TRACED):
        row = summary.get(name, {})
        if not row or "unavailable" in row:
            lines.append(f"| {name} | unavailable | | | | | | | | | | |")
            continue
        cells = [name]
        for key, fmt, ratio in (
            (f"rps_c{high}", "{:,.0f}", True),
            (f"added_p50_us_c{low}", "{:,.0f}", False),
            (f"p99_us_c{low}", "{:,.0f}", False),
            (f"cpu_us_per_request_c{high}", "{:.1f}", False),
        ):
            mine, base = number(row, key), number(floor, key)
            cells.append(fmt.format(mine) if mine is not None else "–")
            if mine is None or not base:
                cells.append("–")
            elif ratio:
                cells.append(f"{mine / base:.2f}x")
            else:
                cells.append(f"{fmt.replace('{:', '{:+').format(mine - base)} ({mine / base:.2f}x)")
        for key in (f"cpu_us_per_request_c{low}", "idle_rss_mb", "rss_mb"):
            value = number(row, key)
            cells.append(f"{value:.1f}" if value is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in (OFF, DEFAULT, TRACED):
        row = summary.get(name, {})
        requests, dropped = row.get("requests_total"), row.get("access_log_dropped_total")
        if not isinstance(requests, int):
            continue
        text = f"{name}: {requests:,} outbound requests since start"
        if isinstance(dropped, int):
            text += f"; access-log lines dropped {dropped:,} (written ~{max(requests - dropped, 0):,})"
        sink = row.get("sink")
        if isinstance(sink, dict):
            text += (
                f"; the sink got {sink.get('traces', 0):,} trace posts, {sink.get('metrics', 0):,} metric posts, "
                f"{int(sink.get('bytes', 0)) / 1e6:,.1f} MB"
            )
        lines.append(text)
    return lines


# --- the sink ----------------------------------------------------------------------------


async def serve_sink(host: str = "127.0.0.1", port: int = 0) -> None:
    """An OTLP/HTTP stand-in: answer 200 to every export and forget it; prints `listening H:P`."""
    from aiohttp import web

    counts = {"traces": 0, "metrics": 0, "bytes": 0, "pid": os.getpid()}

    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        counts[request.match_info["kind"]] += 1
        counts["bytes"] += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def show(_: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/{kind:traces|metrics}", export)
    app.router.add_get("/counts", show)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    print(f"listening {bound[0]}:{bound[1]}", flush=True)
    await asyncio.Event().wait()  # until SIGTERM (the bench stops its process group)


# --- the pieces, in process ------------------------------------------------------------

# What a bench request's outbound span carries (runtime/filters/telemetry.py's _Hop.attributes).
_ATTRIBUTES: dict[str, str | int] = {
    "http.request.method": "GET", "url.path": "/", "url.scheme": "http", "network.protocol.name": "http",
    "network.protocol.version": "1.1", "starmesh.decision": "forwarded", "starmesh.destination.service": "app",
    "http.response.status_code": 200, "server.address": "app", "network.peer.address": "127.0.0.1",
    "network.peer.port": 40000, "starmesh.route": "route/app/1 mesh.star:20", "starmesh.destination.version": "v1",
    "starmesh.source": "client",
}  # fmt: skip


def pieces(n: int) -> list[str]:
    """µs per request (best of 5) of each telemetry piece on its own, with the proxy's own code:
    the traceparent of an unsampled request, a sampled request's SDK span, its OTLP encoding
    (the exporter thread's work, per span of a 512-span batch) and an access-log line's rendering
    (the writer thread's). No sockets: what the pieces cost, not what they do to a run."""
    import time

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from starmesh.runtime.access_log import AccessEntry, render
    from starmesh.runtime.tracing import Tracer

    class Keep(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.spans.extend(spans)
            return SpanExportResult.SUCCESS

    def best(step: Callable[[], object], count: int) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(count):
                step()
            times.append((time.perf_counter() - start) / count * 1e6)
        return min(times)

    plain, keep = Tracer("client", "v1"), Keep()
    exporting = Tracer("client", "v1", exporter=keep, max_queue_size=1 << 20, schedule_delay_ms=10)

    def unsampled() -> None:
        plain.propagate([("host", "app"), ("user-agent", "wrk")], 1.0, False, "GET")

    def sampled() -> None:
        _, span = exporting.propagate([("host", "app"), ("user-agent", "wrk")], 100.0, False, "GET")
        assert span is not None
        exporting.end_span(span, dict(_ATTRIBUTES), None, time.time_ns())

    lines = [f"traceparent, unsampled (sample_percent 1, no endpoint)  {best(unsampled, n):6.2f} µs"]
    lines.append(f"span start, attributes, end (SDK, sampled)             {best(sampled, max(n // 4, 512)):6.2f} µs")
    exporting.flush()
    batch = keep.spans[:512]
    size = len(encode_spans(batch).SerializeToString())
    per_span = best(lambda: encode_spans(batch).SerializeToString(), 3) / len(batch)
    lines.append(f"OTLP protobuf encoding, per span of {len(batch)}               {per_span:6.2f} µs  ({size / len(batch):.0f} bytes)")
    entry = AccessEntry(time.time(), "outbound", "GET", "/", "HTTP/1.1", 200, "", "app", "127.0.0.1:40000", "v1",
                        "route/app/1 mesh.star:20", 0.0004, 0, 24, "4bf92f3577b34da6a3ce929d0e0e4736", "client", None,
                        "app", "wrk")  # fmt: skip
    lines.append(f"access-log line, rendered (writer thread)              {best(lambda: render(entry), n):6.2f} µs  "
                 f"({len(render(entry))} bytes)")  # fmt: skip
    exporting.shutdown()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The OTLP sink for bench/proxy.py --telemetry, or the pieces timed in process.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sink", action="store_true", help="run the OTLP/HTTP sink on 127.0.0.1")
    mode.add_argument("--pieces", action="store_true", help="time each telemetry piece in process")
    parser.add_argument("--port", type=int, default=0, help="the sink's port (default: a free one)")
    parser.add_argument("--n", type=int, default=20_000, help="requests per timing for --pieces (default 20,000)")
    args = parser.parse_args(argv)
    if args.pieces:
        print("\n".join(pieces(args.n)))
    else:
        asyncio.run(serve_sink(port=args.port))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
