"""Metrics of a mesh (mTLS) inbound listener: connections open over mTLS count as `mesh`,
accepted and refused connections per transport and reason, sources from the proven identity.

In process, wired as runtime/proxy.py wires the inbound side with a workload identity
(tests/runtime/mtls_support.py: a real test CA, SVIDs from real CSRs, its echo app).
"""

from __future__ import annotations

import asyncio
import random
import runpy
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from starmesh.runtime.apply import Applier
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.server import start_listener
from starmesh.runtime.message import Request
from starmesh.runtime.otel_gauges import StateSources, register_state_gauges
from starmesh.runtime.otel_metrics import ProxyMetrics
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.tls import InboundTLS, MeshTLS

support = SimpleNamespace(**runpy.run_path(str(Path(__file__).with_name("mtls_support.py")), run_name="mtls_support"))

DEADLINE = 30.0

POLICY = """
mesh(name = "m", mtls = "strict")
service(name = "reviews", versions = ["v1"])
service(name = "productpage", versions = ["v1"])
"""

REQUEST = b"GET /r HTTP/1.1\r\nHost: reviews\r\n\r\n"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


async def exchange(host: str, port: int, context: ssl.SSLContext | None) -> tuple[asyncio.StreamWriter, bytes]:
    """Open a connection, send one keep-alive request, read the answer's head; the open writer."""
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    return writer, head


def test_mesh_connections_and_tls_counts(tmp_path: Path) -> None:
    ca = support.MeshTestCA.create(tmp_path / "ca")
    server, client = ca.svid("reviews"), ca.svid("productpage")
    bundle = support.compile_policy(tmp_path / "policy", POLICY)

    async def scenario() -> None:
        async with support.echo_app() as app:
            recorder = MemoryRecorder()
            mesh = MeshTLS.from_ca_pem(support.Contexts(ca.cert, server), ca.cert.read_bytes())
            pool = UpstreamPool()
            deps = ChainDeps(pool=pool, endpoints=Endpoints(), state=StateRegistry(), recorder=recorder,
                             local_service="reviews", local_version="v1", rng=random.Random(1))  # fmt: skip
            applier = Applier(deps, app=app, state_dir=None)
            assert (await applier.apply(bundle, expected_digest=None, release_version=None, origin="file")).ok
            tls = InboundTLS(mesh, lambda: None if applier.current is None else applier.current.inbound_policy)

            def inbound(request: Request) -> Any:
                assert applier.current is not None
                return applier.current.inbound(request)

            listener = await start_listener("127.0.0.1", 0, inbound, side="inbound", tls=tls,
                                            connections=recorder.connections)  # fmt: skip
            metrics = ProxyMetrics(recorder, gauges=lambda m: register_state_gauges(m, StateSources(applier, tls)))
            host, port = listener.sockets[0].getsockname()[:2]
            held: asyncio.StreamWriter | None = None
            try:
                held, head = await exchange(host, port, support.client_context(ca.cert, client))
                assert head.startswith(b"HTTP/1.1 200"), head
                plain, refused = await asyncio.open_connection(host, port)
                refused.write(REQUEST)
                try:
                    assert await plain.read() == b""  # strict: closed without an answer
                except ConnectionResetError:
                    pass  # (or reset, the request unread)
                refused.close()
                found = samples(metrics.render().decode())
                assert found["starmesh_active_connections", frozenset({("listener", "mesh")})] == 1
                assert found["starmesh_active_connections", frozenset({("listener", "inbound")})] == 0
                assert found["starmesh_inbound_connections_total", frozenset({("transport", "mtls")})] == 1
                assert found["starmesh_inbound_connections_total", frozenset({("transport", "plaintext")})] == 0
                assert found["starmesh_inbound_connections_refused_total", frozenset({("reason", "plaintext")})] == 1
                served = {"direction": "inbound", "source_service": "productpage", "destination_service": "reviews",
                          "destination_version": "v1", "response_code": "200", "reason": ""}  # fmt: skip
                assert found["starmesh_requests_total", frozenset(served.items())] == 1
                held.close()
                held = None
                for _ in range(200):  # the server side sees the close a moment later
                    if recorder.connections("mesh").n == 0:
                        break
                    await asyncio.sleep(0.01)
                found = samples(metrics.render().decode())
                assert found["starmesh_active_connections", frozenset({("listener", "mesh")})] == 0
            finally:
                if held is not None:
                    held.close()
                metrics.shutdown()
                listener.close()
                await listener.wait_closed()
                await pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), DEADLINE))
