"""`starmesh proxy --bundle`: real proxy processes, real upstream apps, on loopback.

Each test starts `python -m starmesh.cli proxy` with port-0 listeners, reads the bound
addresses it prints, and talks to it with plain HTTP; upstream apps are small aiohttp
servers in a background thread, each answering with its own name.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from starmesh.bundle.canonical import decode_bundle, digest_of, encode_bundle
from starmesh.bundle.decide import DecisionTable, RequestInfo
from starmesh.cli.main import main
from starmesh.compiler.compile import compile_tree

DEADLINE = 20.0  # seconds; a bound on waiting for a process, never an assertion about speed

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [
    rule(match = [match(headers = {{"x-canary": "1"}})], backends = {{"v2": 100}}),
    rule(backends = {{"{default}": 100}}),
])
request_test(name = "default goes to {default}", service = "api", backends = "{default}")
"""


# -- upstream apps -------------------------------------------------------------------


class Upstreams:
    """aiohttp apps on 127.0.0.1:0 in one background event loop; each answers its name."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def start(self, name: str, *, hold: tuple[threading.Event, threading.Event] | None = None) -> str:
        """Serve `name`; with `hold` = (arrived, release) each request sets `arrived` and
        waits for `release` before answering."""

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            if hold is not None:
                arrived, release = hold
                arrived.set()
                await asyncio.get_running_loop().run_in_executor(None, release.wait, DEADLINE)
            return web.Response(text=name, headers={"x-upstream": name, "x-seen-table": request.headers.get("x-table", "")})

        async def serve() -> str:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
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


# -- proxy processes -----------------------------------------------------------------


@dataclass
class ProxyProcess:
    """A running `starmesh proxy` and what it printed."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    printed: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    status: str = ""

    def read_start(self) -> None:
        """Read the start-up lines up to `ready ...` or `not ready: ...`."""
        end = time.monotonic() + DEADLINE
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the proxy printed no status line: {self.printed}") from None
            if line is None:
                raise AssertionError(f"the proxy exited ({self.process.wait()}): {self.printed}")
            self.printed.append(line)
            word, _, rest = line.partition(" ")
            if word in ("outbound", "inbound", "admin"):
                self.addresses[word] = rest
            if line.startswith(("ready ", "not ready: ")):
                self.status = line
                return

    def admin(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return http_get(self.addresses["admin"], path)

    def config(self) -> dict[str, Any]:
        status, _, body = self.admin("/config")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def wait_config(self, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        end = time.monotonic() + DEADLINE
        while True:
            config = self.config()
            if test(config):
                return config
            if time.monotonic() > end:
                raise AssertionError(f"/config never reached the expected state: {config}")
            time.sleep(0.01)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def http_get(address: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(bundle: Path, *, app: str = "127.0.0.1:1", endpoints: Path | None = None,
              state_dir: Path | None = None) -> ProxyProcess:
        args = [
            sys.executable, "-m", "starmesh.cli", "proxy",
            "--service", "web", "--version", "v1", "--app", app,
            "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--state-dir", str(state_dir or tmp_path / "state"), "--bundle", str(bundle),
        ]
        if endpoints is not None:
            args += ["--endpoints", str(endpoints)]
        stderr = open(tmp_path / f"proxy-{len(started)}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stderr.close()
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        proxy = ProxyProcess(process, lines)
        started.append(proxy)
        proxy.read_start()
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
        proxy.process.wait()
        if proxy.process.stdout is not None:
            proxy.process.stdout.close()


# -- bundles -------------------------------------------------------------------------


def compile_bundle(tmp_path: Path, default: str) -> bytes:
    root = tmp_path / f"policy-{default}"
    root.mkdir(exist_ok=True)
    (root / "mesh.star").write_text(POLICY.format(default=default))
    result = compile_tree(root)
    assert result.data is not None, result.findings
    return result.data


def golden_failing(data: bytes) -> bytes:
    """A canonical bundle whose golden request does not hold (compile would refuse it)."""
    bundle = decode_bundle(data)
    import msgspec

    tests = tuple(msgspec.structs.replace(t, backends={"v2": 100}) for t in bundle.spec.request_tests)
    spec = msgspec.structs.replace(bundle.spec, request_tests=tests)
    return encode_bundle(msgspec.structs.replace(bundle, spec=spec))[0]


def write(path: Path, data: bytes) -> Path:
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)
    return path


@pytest.fixture
def mesh(tmp_path: Path, upstreams: Upstreams) -> dict[str, Any]:
    """Two upstream versions of `api`, an endpoints file, the v1 and v2 bundles."""
    v1, v2 = upstreams.start("api-v1"), upstreams.start("api-v2")
    endpoints = write(tmp_path / "endpoints.json", json.dumps({"api": {"v1": [v1], "v2": [v2]}}).encode())
    return {"endpoints": endpoints, "v1": compile_bundle(tmp_path, "v1"), "v2": compile_bundle(tmp_path, "v2")}


def call_api(proxy: ProxyProcess, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return http_get(proxy.addresses["outbound"], "/", {"Host": "api", **headers})


# -- tests ---------------------------------------------------------------------------


def test_ready_with_a_bundle_file(tmp_path: Path, mesh: dict[str, Any], start_proxy: Callable[..., ProxyProcess]) -> None:
    bundle = write(tmp_path / "bundle.json", mesh["v1"])
    proxy = start_proxy(bundle, endpoints=mesh["endpoints"])
    assert proxy.printed[0] == "starmesh proxy: links are plaintext (local development: --bundle without certificates)"
    assert [line.split(" ")[0] for line in proxy.printed[1:4]] == ["outbound", "inbound", "admin"]
    assert proxy.status == f"ready {digest_of(mesh['v1'])}"
    assert proxy.admin("/healthz")[0] == 200
    assert proxy.admin("/readyz")[:1] == (200,)
    config = proxy.config()
    assert config["release_version"] is None
    assert config["bundle"] == digest_of(mesh["v1"])
    assert config["origin"] == "file"
    assert config["applied_at"].endswith("Z")
    assert (config["service"], config["version"], config["last_error"]) == ("web", "v1", None)
    assert config["listeners"] == {**proxy.addresses, "app": "127.0.0.1:1"}
    assert call_api(proxy)[2] == b"api-v1"
    assert call_api(proxy, **{"x-canary": "1"})[2] == b"api-v2"
    status, headers, _ = http_get(proxy.addresses["outbound"], "/", {"Host": "nope"})
    assert (status, headers["x-starmesh-error"]) == (404, "no-route")
    assert proxy.stop() == 0


def test_inbound_forwards_to_the_app(
    tmp_path: Path, mesh: dict[str, Any], upstreams: Upstreams, start_proxy: Callable[..., ProxyProcess]
) -> None:
    app = upstreams.start("web-app")
    proxy = start_proxy(write(tmp_path / "bundle.json", mesh["v1"]), app=app, endpoints=mesh["endpoints"])
    status, headers, body = http_get(proxy.addresses["inbound"], "/hello")
    assert (status, body, headers["x-upstream"]) == (200, b"web-app", "web-app")


def test_sigterm_lets_an_in_flight_request_finish(
    tmp_path: Path, upstreams: Upstreams, start_proxy: Callable[..., ProxyProcess]
) -> None:
    arrived, release = threading.Event(), threading.Event()
    slow = upstreams.start("api-v1", hold=(arrived, release))
    endpoints = write(tmp_path / "endpoints.json", json.dumps({"api": {"v1": [slow]}}).encode())
    proxy = start_proxy(write(tmp_path / "bundle.json", compile_bundle(tmp_path, "v1")), endpoints=endpoints)
    answers: list[tuple[int, bytes]] = []

    def call() -> None:
        status, _, body = call_api(proxy)
        answers.append((status, body))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert arrived.wait(DEADLINE), "the request never reached the upstream"
        proxy.process.send_signal(signal.SIGTERM)
        log = tmp_path / "proxy-0.log"
        end = time.monotonic() + DEADLINE
        while "stopping: no new connections" not in log.read_text():
            assert time.monotonic() < end, "the proxy never acted on SIGTERM"
            time.sleep(0.01)
        assert proxy.process.poll() is None, "the proxy exited with a request in flight"
    finally:
        release.set()
        caller.join(DEADLINE)
    assert answers == [(200, b"api-v1")]
    assert proxy.process.wait(DEADLINE) == 0


def test_explain_equals_the_decision_tables_trace(
    tmp_path: Path, mesh: dict[str, Any], start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = start_proxy(write(tmp_path / "bundle.json", mesh["v1"]), endpoints=mesh["endpoints"])
    status, _, body = proxy.admin("/explain?service=api&path=/a%3Fb%3D1&method=PUT&source=web&header=x-canary:1")
    assert status == 200
    expected = DecisionTable.build(decode_bundle(mesh["v1"]).spec).explain(
        RequestInfo(service="api", method="PUT", path="/a?b=1", headers=(("x-canary", "1"),), source="web")
    )
    assert json.loads(body) == expected.to_json()
    status, _, body = proxy.admin("/explain?service=nope")
    assert status == 404 and "unknown service 'nope'" in json.loads(body)["error"]


def test_not_ready_without_a_valid_bundle_or_last_known_good(
    tmp_path: Path, start_proxy: Callable[..., ProxyProcess]
) -> None:
    bundle = write(tmp_path / "bundle.json", b'{"apiVersion": "starmesh/v1"}')
    proxy = start_proxy(bundle)
    assert proxy.status.startswith(f"not ready: bundle file {bundle} not applied: bundle rejected: invalid bundle")
    assert proxy.status.endswith(f"no last-known-good in {tmp_path / 'state'}")
    status, _, body = proxy.admin("/readyz")
    assert status == 503 and body.decode() == proxy.status + "\n"
    status, headers, body = http_get(proxy.addresses["outbound"], "/", {"Host": "api"})
    assert (status, headers["x-starmesh-error"]) == (503, "not-ready")
    status, headers, _ = http_get(proxy.addresses["inbound"], "/")
    assert (status, headers["x-starmesh-error"]) == (503, "not-ready")
    config = proxy.config()
    assert config["bundle"] is None and "invalid bundle" in config["last_error"]["error"]
    assert proxy.stop() == 0


def test_golden_failing_bundle_without_last_known_good(
    tmp_path: Path, mesh: dict[str, Any], start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = start_proxy(write(tmp_path / "bundle.json", golden_failing(mesh["v1"])), endpoints=mesh["endpoints"])
    assert "golden requests failed against the new route table" in proxy.status
    assert proxy.status.startswith("not ready: ")


def test_restart_from_last_known_good(
    tmp_path: Path, mesh: dict[str, Any], start_proxy: Callable[..., ProxyProcess]
) -> None:
    bundle = write(tmp_path / "bundle.json", mesh["v2"])
    first = start_proxy(bundle, endpoints=mesh["endpoints"])
    assert first.stop() == 0
    state = tmp_path / "state"
    files = sorted(p.relative_to(state).as_posix() for p in state.rglob("*"))
    assert files == ["bundles", f"bundles/{digest_of(mesh['v2']).replace(':', '-')}.json", "last-known-good.a.json"]

    for broken, why in ((b"not json", "bundle is not valid JSON"), (golden_failing(mesh["v1"]), "golden requests failed")):
        write(bundle, broken)
        proxy = start_proxy(bundle, endpoints=mesh["endpoints"])
        assert proxy.status == f"ready {digest_of(mesh['v2'])}"
        config = proxy.config()
        assert (config["origin"], config["bundle"]) == ("last-known-good", digest_of(mesh["v2"]))
        assert why in config["last_error"]["error"]
        assert call_api(proxy)[2] == b"api-v2"  # the endpoints came back with it
        assert proxy.stop() == 0
    assert sorted(p.relative_to(state).as_posix() for p in state.rglob("*")) == files


def test_a_corrupt_last_known_good_is_ignored(
    tmp_path: Path, mesh: dict[str, Any], start_proxy: Callable[..., ProxyProcess]
) -> None:
    bundle = write(tmp_path / "bundle.json", mesh["v1"])
    assert start_proxy(bundle, endpoints=mesh["endpoints"]).stop() == 0
    stored = next((tmp_path / "state" / "bundles").iterdir())
    stored.write_bytes(stored.read_bytes().replace(b"v1", b"v2"))
    write(bundle, b"{}")
    proxy = start_proxy(bundle, endpoints=mesh["endpoints"])
    assert proxy.status.startswith("not ready: ")
    assert "last-known-good ignored" in proxy.status and "corrupt: its bytes hash to" in proxy.status


def test_sighup_applies_a_new_file_and_keeps_the_old_table_on_a_bad_one(
    tmp_path: Path, mesh: dict[str, Any], start_proxy: Callable[..., ProxyProcess]
) -> None:
    bundle = write(tmp_path / "bundle.json", mesh["v1"])
    proxy = start_proxy(bundle, endpoints=mesh["endpoints"])
    assert call_api(proxy)[2] == b"api-v1"

    write(bundle, mesh["v2"])
    proxy.process.send_signal(signal.SIGHUP)
    config = proxy.wait_config(lambda c: c["bundle"] == digest_of(mesh["v2"]))
    assert config["origin"] == "file" and config["last_error"] is None
    assert call_api(proxy)[2] == b"api-v2"

    write(bundle, golden_failing(mesh["v1"]))
    proxy.process.send_signal(signal.SIGHUP)
    config = proxy.wait_config(lambda c: c["last_error"] is not None)
    assert config["bundle"] == digest_of(mesh["v2"])
    assert config["last_error"]["bundle"] == digest_of(golden_failing(mesh["v1"]))
    assert "golden requests failed" in config["last_error"]["error"]
    assert call_api(proxy)[2] == b"api-v2"

    write(bundle, mesh["v1"])
    write(mesh["endpoints"], b'{"api": {"v1": ["not an address"]}}')
    proxy.process.send_signal(signal.SIGHUP)
    config = proxy.wait_config(lambda c: "not an address" in (c["last_error"] or {}).get("error", ""))
    assert config["bundle"] == digest_of(mesh["v2"])
    assert f"{mesh['endpoints']}: api/v1: 'not an address' is not HOST:PORT" in config["last_error"]["error"]
    assert proxy.stop() == 0
    log = (tmp_path / "proxy-0.log").read_text()
    assert "SIGHUP: the files were not applied" in log


def test_an_address_in_use_exits_2(tmp_path: Path, mesh: dict[str, Any]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "%s:%d" % taken.getsockname()
        result = subprocess.run(
            [
                sys.executable, "-m", "starmesh.cli", "proxy", "--service", "web", "--version", "v1",
                "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0",
                "--admin", address, "--state-dir", str(tmp_path / "state"),
                "--bundle", str(write(tmp_path / "bundle.json", mesh["v1"])),
            ],
            capture_output=True, text=True, timeout=DEADLINE,
        )
    assert result.returncode == 2, result.stderr
    assert f"starmesh: error: --admin {address}: cannot listen" in result.stderr
    assert "ready" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--outbound", "nope"], "--outbound: 'nope' is not HOST:PORT"),
        (["--app", "127.0.0.1:0"], "--app: '127.0.0.1:0': port 0 is not a number from 1 to 65535"),
        (["--admin", "127.0.0.1:70000"], "--admin: '127.0.0.1:70000': port 70000 is not a number"),
        (["--control-plane", "http://127.0.0.1:1"], "give exactly one of --bundle FILE"),
        (["--bundle", None], "give --control-plane URL (with --trust FILE), or --bundle FILE"),
        (["--ca-cert", "ca.crt"], "--ca-cert comes with the security issue (5"),
        (["--join-token", "t"], "--join-token comes with the security issue (5"),
        (["--trust", "signing.pub"], "--trust goes with --control-plane"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str | None], message: str) -> None:
    bundle = write(tmp_path / "bundle.json", b"{}")
    options = {
        "--service": "web", "--version": "v1", "--app": "127.0.0.1:1", "--inbound": "127.0.0.1:0",
        "--outbound": "127.0.0.1:0", "--admin": "127.0.0.1:0", "--state-dir": str(tmp_path / "s"),
        "--bundle": str(bundle),
    }
    options[str(args[0])] = args[1]  # type: ignore[assignment]
    argv = ["proxy"] + [x for k, v in options.items() if v is not None for x in (k, v)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output
