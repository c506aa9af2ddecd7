"""Apply under load: two bundles swapped 100 times (SIGHUP) while clients send continuously.

Bundle A sends every `api` request to v1 and sets `x-table: A`; bundle B sends it to v2
and sets `x-table: B`. Each upstream echoes the `x-table` it received (`x-seen-table`), so a response
shows both halves of the config that carried it: (api-v1, A) or (api-v2, B). Anything
else (a mix, an error, a proxy-made answer) means a request saw half of two configs or
failed during a swap.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from starmesh.bundle.canonical import digest_of

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


def compile_bundle(rt: Any, tmp_path: Path, version: str, table: str) -> bytes:
    return rt.compile_policy(tmp_path / f"policy-{table}", POLICY.format(version=version, table=table))


@pytest.fixture
def proxy(tmp_path: Path, upstreams: Any, proxies: Any, rt: Any) -> tuple[Any, Path]:
    """A `--bundle` proxy applying bundle A, its upstreams api-v1 and api-v2; and the bundle file."""
    v1, v2 = upstreams.start("api-v1"), upstreams.start("api-v2")
    endpoints = rt.write(tmp_path / "endpoints.json", json.dumps({"api": {"v1": [v1], "v2": [v2]}}).encode())
    bundle = rt.write(tmp_path / "bundle.json", compile_bundle(rt, tmp_path, "v1", "A"))
    started = proxies.start(bundle=bundle, endpoints=endpoints)
    assert started.status.startswith("ready "), started.status
    return started, bundle


def applied_digest(proxy: Any) -> str:
    digest: str = proxy.config()["bundle"]
    return digest


def test_swapping_two_bundles_under_load_fails_no_request(tmp_path: Path, proxy: tuple[Any, Path], rt: Any) -> None:
    running, bundle = proxy
    bundles = [compile_bundle(rt, tmp_path, "v1", "A"), compile_bundle(rt, tmp_path, "v2", "B")]
    digests = [digest_of(b) for b in bundles]
    assert applied_digest(running) == digests[0]

    stop = threading.Event()
    seen: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        host, _, port = running.outbound.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
        local: Counter[str] = Counter()
        try:
            while not stop.is_set():
                try:
                    conn.request("GET", "/item", headers={"Host": "api"})
                    response = conn.getresponse()
                    body = f"{response.read().decode()} {response.getheader('x-seen-table') or '-'}"
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
            rt.write(bundle, bundles[which])
            running.process.send_signal(signal.SIGHUP)
            end = time.monotonic() + DEADLINE
            while applied_digest(running) != digests[which]:
                assert time.monotonic() < end, f"swap {swap} never applied"
                time.sleep(0.002)
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)

    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:5]}"
    assert set(seen) <= {"api-v1 A", "api-v2 B"}, f"a response mixed two tables: {seen}"
    assert seen["api-v1 A"] > 0 and seen["api-v2 B"] > 0, seen
    assert running.process.popen.poll() is None
