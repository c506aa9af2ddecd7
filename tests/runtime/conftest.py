"""What the proxy tests share: policies compiled to bundles, control-plane doubles, upstream
apps, and real `starmesh proxy` processes.

In importlib mode a test module can import neither another test module nor a conftest,
so the helpers come as fixtures:

    rt          helpers: compile_policy(root, text), golden_failing(data), write(path, data),
                dead_url(), trust_file(directory, key), sample(text, name, **labels),
                BackgroundApps (aiohttp apps served from a loop in a thread), DEADLINE
    bundles     bundles.v1, .v2: POLICY routing `api` to v1 (v2), compiled once per session;
                .golden_failing: v1 with golden requests that do not hold
    planes      planes(**kw) starts a ControlPlaneDouble (tests/runtime/control_plane_double.py);
                every one is closed when the test ends
    cp          one ControlPlaneDouble
    upstreams   aiohttp apps on 127.0.0.1:0 in one background loop, each answering its name
    proxies     proxies.start(bundle=... | control_plane=[...], trust=[...]): `starmesh proxy`
                as service web v1 (tests/runtime/e2e/conftest.py's `Proxy`), stderr in
                tmp_path/proxy-N.log, state in tmp_path/state
    mesh        tests/runtime/e2e/conftest.py's fixture: the `Mesh` the proxies run in; it
                stops them when the test ends, and each must exit 0 on SIGTERM

Helper files are loaded by path (runpy): tests/runtime/e2e/conftest.py for processes,
tests/runtime/control_plane_double.py for the double.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import socket
import threading
import ssl
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import msgspec
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from starmesh.bundle.canonical import decode_bundle, encode_bundle
from starmesh.bundle.keys import PrivateKey, public_key_pem
from starmesh.compiler.compile import compile_tree

HERE = Path(__file__).parent
e2e = SimpleNamespace(**runpy.run_path(str(HERE / "e2e" / "conftest.py"), run_name="starmesh_e2e_support"))
double = SimpleNamespace(**runpy.run_path(str(HERE / "control_plane_double.py"), run_name="starmesh_cp_double"))

DEADLINE = double.DEADLINE
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""

T = TypeVar("T")


# -- bundles and files -----------------------------------------------------------------------


def compile_policy(root: Path, text: str) -> bytes:
    """`text` as root/mesh.star (root created if missing), compiled: the bundle's bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mesh.star").write_text(text)
    result = compile_tree(root)
    assert result.data is not None, result.findings
    return result.data


def golden_failing(data: bytes) -> bytes:
    """A canonical bundle whose golden requests expect v2 (compile would refuse it)."""
    bundle = decode_bundle(data)
    tests = tuple(msgspec.structs.replace(t, backends={"v2": 100}) for t in bundle.spec.request_tests)
    spec = msgspec.structs.replace(bundle.spec, request_tests=tests)
    return encode_bundle(msgspec.structs.replace(bundle, spec=spec))[0]


def write(path: Path, data: bytes) -> Path:
    """Replace `path` whole (temp file, rename), as a deploy tool would; the path."""
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)
    return path


def dead_url() -> str:
    """An http:// URL on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % sock.getsockname()[1]


def trust_file(directory: Path, key: PrivateKey) -> Path:
    """`key`'s public half as a PEM file in `directory` (what `--trust` takes)."""
    path = directory / f"trust-{id(key)}.pub"
    path.write_bytes(public_key_pem(key.public_key()))
    return path


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` in a Prometheus text (prometheus_client parses
    it), None when absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


# -- aiohttp apps in a background loop ------------------------------------------------------------


class BackgroundApps:
    """aiohttp apps on 127.0.0.1:0, served from one event loop in a daemon thread, so that a
    synchronous test (or a child process) can call them while the test blocks.

    `serve(app)` starts one and gives its address (host:port); `run(coroutine)` runs a
    coroutine on the loop and waits for its result; `close()` cleans every app up, then stops
    and closes the loop (again: nothing)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """`coroutine`'s result, run on the background loop (within DEADLINE)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(DEADLINE)

    def serve(self, app: web.Application, *, ssl_context: ssl.SSLContext | None = None, **runner: Any) -> str:
        """Serve `app` on 127.0.0.1:0 (TLS with `ssl_context`; `runner` goes to its
        AppRunner); its address, host:port."""

        async def start() -> str:
            started = web.AppRunner(app, access_log=None, **runner)
            await started.setup()
            self._runners.append(started)
            await web.TCPSite(started, "127.0.0.1", 0, ssl_context=ssl_context).start()
            host, port = started.addresses[0][:2]
            return f"{host}:{port}"

        return self.run(start())

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def stop() -> None:
            for started in self._runners:
                await started.cleanup()

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(DEADLINE)
            self.loop.close()


@pytest.fixture(scope="session")
def rt() -> SimpleNamespace:
    """The helpers above, as one object (see the module docstring)."""
    return SimpleNamespace(
        DEADLINE=DEADLINE, compile_policy=compile_policy, golden_failing=golden_failing, write=write,
        dead_url=dead_url, trust_file=trust_file, sample=sample, BackgroundApps=BackgroundApps,
    )


POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{default}": 100}})])
request_test(name = "api goes to {default}", service = "api", backends = "{default}")
"""
"""The proxies' policy: they run as `web` v1 and call `api`, all of it to version `default`."""


@dataclass(frozen=True)
class Bundles:
    v1: bytes
    v2: bytes
    golden_failing: bytes


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("policies")
    v1, v2 = (compile_policy(root / to, POLICY.format(default=to)) for to in ("v1", "v2"))
    return Bundles(v1, v2, golden_failing(v1))


# -- control-plane doubles ---------------------------------------------------------------------


@pytest.fixture
def planes() -> Iterator[Callable[..., Any]]:
    """planes(**kw): a new ControlPlaneDouble(**kw); all are closed at the end."""
    started: list[Any] = []

    def start(**kw: Any) -> Any:
        plane = double.ControlPlaneDouble(**kw)
        started.append(plane)
        return plane

    try:
        yield start
    finally:
        for plane in started:
            plane.close()


@pytest.fixture
def cp(planes: Callable[..., Any]) -> Any:
    """One ControlPlaneDouble."""
    return planes()


# -- upstream apps -------------------------------------------------------------------------------


class Upstreams:
    """aiohttp apps on 127.0.0.1:0 in one background event loop; each answers its name.

    An answer carries `x-upstream: NAME` and `x-seen-table`: the `x-table` header the
    request arrived with (empty when none)."""

    def __init__(self) -> None:
        self.apps = BackgroundApps()

    def start(self, name: str, *, hold: tuple[threading.Event, threading.Event] | None = None) -> str:
        """Serve `name`; its address. With `hold` = (arrived, release) each request sets
        `arrived` and waits for `release` before answering."""

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            if hold is not None:
                arrived, release = hold
                arrived.set()
                await asyncio.get_running_loop().run_in_executor(None, release.wait, DEADLINE)
            return web.Response(text=name, headers={"x-upstream": name, "x-seen-table": request.headers.get("x-table", "")})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return self.apps.serve(app)

    def close(self) -> None:
        self.apps.close()


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    ups = Upstreams()
    try:
        yield ups
    finally:
        ups.close()


# -- proxy processes -------------------------------------------------------------------------------


mesh = e2e.mesh  # the fixture: a Mesh that stops (and checks) every process it started


class Proxies:
    """Starts `starmesh proxy` processes for one test (service web, version v1) in its `mesh`."""

    def __init__(self, mesh: Any, tmp_path: Path) -> None:
        self.mesh = mesh
        self.tmp_path = tmp_path
        self.started = 0

    def start(
        self,
        *,
        bundle: Path | None = None,
        endpoints: Path | None = None,
        control_plane: Sequence[str] = (),
        trust: Sequence[Path] = (),
        app: str = "127.0.0.1:1",
        state: Path | None = None,
    ) -> Any:
        """A proxy in the `--bundle` form or, without `bundle`, the control-plane form, once
        it has printed its listeners and its start-up status (`proxy.status`)."""
        extra = [arg for url in control_plane for arg in ("--control-plane", url)]
        extra += [arg for path in trust for arg in ("--trust", str(path))]
        log = self.tmp_path / f"proxy-{self.started}.log"
        self.started += 1
        proxy = self.mesh.start_proxy(
            "web", "v1", app, bundle, endpoints, extra, state=state or self.tmp_path / "state", log=log
        )
        proxy.read_status(DEADLINE)
        return proxy


@pytest.fixture
def proxies(mesh: Any, tmp_path: Path) -> Proxies:
    return Proxies(mesh, tmp_path)
