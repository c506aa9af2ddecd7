"""Apply under load: two bundles swapped 100 times (SIGHUP) while clients send continuously.

Bundle A sends every `api` request to v1 and sets `x-table: A`; bundle B sends it to v2
and sets `x-table: B`. Each upstream echoes the `x-table` it received, so a response
shows both halves of the config that carried it: (api-v1, A) or (api-v2, B). Anything
else (a mix, an error, a proxy-made answer) means a request saw half of two configs or
failed during a swap.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from starmesh.bundle.canonical import digest_of
from starmesh.compiler.compile import compile_tree

DEADLINE = 30.0  # seconds; bounds waits, never asserted on
SWAPS = 100
CLIENTS = 4

POLICY = """
mesh(name = "load", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{version}": 100}}, set_request_headers = {{"x-table": "{table}"}})])
request_test(name = "api goes to {version}", service = "api", backends = "{version}")
"""


def compile_bundle(tmp_path: Path, version: str, table: str) -> bytes:
    root = tmp_path / f"policy-{table}"
    root.mkdir(exist_ok=True)
    (root / "mesh.star").write_text(POLICY.format(version=version, table=table))
    result = compile_tree(root)
    assert result.data is not None, result.findings
    return result.data


def write(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)


class Upstreams:
    """Two aiohttp apps (api-v1, api-v2) in a background loop, echoing `x-table`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def start(self, name: str) -> str:
        async def handle(request: web.Request) -> web.Response:
            return web.Response(text=f"{name} {request.headers.get('x-table', '-')}")

        async def serve() -> str:
            app = web.Application()
            app.router.add_get("/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.runners.append(runner)
            host, port = runner.addresses[0][:2]
            return f"{host}:{port}"

        return asyncio.run_coroutine_threadsafe(serve(), self.loop).result(DEADLINE)

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    ups = Upstreams()
    try:
        yield ups
    finally:
        ups.close()


@pytest.fixture
def proxy(tmp_path: Path, upstreams: Upstreams) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Path]]:
    v1, v2 = upstreams.start("api-v1"), upstreams.start("api-v2")
    endpoints = tmp_path / "endpoints.json"
    write(endpoints, json.dumps({"api": {"v1": [v1], "v2": [v2]}}).encode())
    bundle = tmp_path / "bundle.json"
    write(bundle, compile_bundle(tmp_path, "v1", "A"))
    args = [
        sys.executable, "-m", "starmesh.cli", "proxy", "--service", "web", "--version", "v1",
        "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
        "--bundle", str(bundle), "--endpoints", str(endpoints),
    ]
    with open(tmp_path / "proxy.log", "w") as log:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        addresses: dict[str, str] = {}
        while True:
            line = lines.get(timeout=DEADLINE)
            word, _, rest = line.partition(" ")
            addresses[word] = rest
            if word in ("ready", "not"):
                assert word == "ready", line
                break
        yield process, addresses, bundle
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def applied_digest(admin: str) -> str:
    host, _, port = admin.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    try:
        conn.request("GET", "/config")
        digest: str = json.loads(conn.getresponse().read())["bundle"]
        return digest
    finally:
        conn.close()


def test_swapping_two_bundles_under_load_fails_no_request(
    tmp_path: Path, proxy: tuple[subprocess.Popen[str], dict[str, str], Path]
) -> None:
    process, addresses, bundle = proxy
    bundles = [compile_bundle(tmp_path, "v1", "A"), compile_bundle(tmp_path, "v2", "B")]
    digests = [digest_of(b) for b in bundles]
    assert applied_digest(addresses["admin"]) == digests[0]

    stop = threading.Event()
    seen: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        host, _, port = addresses["outbound"].rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
        local: Counter[str] = Counter()
        try:
            while not stop.is_set():
                try:
                    conn.request("GET", "/item", headers={"Host": "api"})
                    response = conn.getresponse()
                    body = response.read().decode()
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    continue
                if response.status != 200:
                    with lock:
                        failures.append(f"{response.status} {response.getheader('x-starmesh-error')} {body!r}")
                local[body] += 1
        finally:
            conn.close()
            with lock:
                seen.update(local)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        for swap in range(1, SWAPS + 1):
            which = swap % 2
            write(bundle, bundles[which])
            process.send_signal(signal.SIGHUP)
            end = time.monotonic() + DEADLINE
            while applied_digest(addresses["admin"]) != digests[which]:
                assert time.monotonic() < end, f"swap {swap} never applied"
                time.sleep(0.002)
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)

    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:5]}"
    assert set(seen) <= {"api-v1 A", "api-v2 B"}, f"a response mixed two tables: {seen}"
    assert seen["api-v1 A"] > 0 and seen["api-v2 B"] > 0, seen
    assert process.poll() is None
