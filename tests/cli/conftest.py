"""Shared helpers for the CLI tests: output snapshots, policy repositories, control-plane processes.

In importlib mode a test module can import neither another test module nor a conftest,
so the helpers come as fixtures:

    assert_snapshot(name, text)    compare with tests/cli/snapshots/NAME
    runner                         a CliRunner: no colour, no HTTP proxy (all is loopback)
    h.make_repo(path)              a Git repo on branch main, committer set, unsigned commits
    h.commit(repo, text, message)  mesh.star = text, committed; the new commit's sha
    h.git(repo, *args)             git in that repo; its stdout, stripped
    h.reviews(v1, v2)              mesh.star text: service `reviews`, v1/v2 weighted v1:v2
    h.closed_port()                a loopback port nobody listens on
    control_planes.start(args)     `starmesh control-plane ARGS` (a `ControlPlane`); with
                                   `log=FILE` its stderr goes there and its lines are
                                   stdout alone
    control_planes.replicas(...)   control-plane replicas on one etcd store, listening, the
                                   first one leading
    mesh                           where they run: tests/runtime/e2e/conftest.py's `Mesh`
                                   (that file, loaded by path, gives `Process` too), which
                                   stops them when the test ends: each must exit 0 on SIGTERM
    fake_server(handler)           a `FakeServer`: an aiohttp app on 127.0.0.1:0 answering every
                                   path with `handler` (what a real control plane will not do);
                                   its `url`; each is closed when the test ends
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

SNAPSHOTS = Path(__file__).parent / "snapshots"
STARMESH = Path(sys.executable).with_name("starmesh")
DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""

e2e = SimpleNamespace(
    **runpy.run_path(str(Path(__file__).parents[1] / "runtime" / "e2e" / "conftest.py"), run_name="starmesh_e2e_support")
)


def _assert_snapshot(name: str, actual: str) -> None:
    """Compare with tests/cli/snapshots/NAME; STARMESH_UPDATE_SNAPSHOTS=1 rewrites it."""
    path = SNAPSHOTS / name
    if os.environ.get("STARMESH_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"missing snapshot {path}: run with STARMESH_UPDATE_SNAPSHOTS=1 to create it"
    assert actual == path.read_text(encoding="utf-8"), f"output differs from {path}"


@pytest.fixture
def assert_snapshot() -> Callable[[str, str], None]:
    """The snapshot comparison (a fixture: importlib mode cannot import conftest)."""
    return _assert_snapshot


@pytest.fixture
def runner() -> CliRunner:
    """The CLI in-process, without colour, and without an HTTP proxy between it and 127.0.0.1."""
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None, "NO_PROXY": "*", "no_proxy": "*"})


# -- policy repositories ---------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def make_repo(path: Path) -> Path:
    """A new repository at `path` (created), branch main, with a local committer."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "starmesh tests")
    git(path, "config", "user.email", "tests@starmesh.invalid")
    git(path, "config", "commit.gpgsign", "false")
    return path


def commit(repo: Path, text: str, message: str = "policy") -> str:
    """Write `text` as repo/mesh.star and commit it; the new commit's sha."""
    (repo / "mesh.star").write_text(text, encoding="utf-8")
    git(repo, "add", "mesh.star")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


REVIEWS = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""


def reviews(v1: int, v2: int) -> str:
    """A policy of one service, `reviews`, whose traffic goes v1:v2 to its two versions."""
    return REVIEWS.format(v1=v1, v2=v2)


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def h() -> SimpleNamespace:
    """The helpers above, as one object (see the module docstring)."""
    return SimpleNamespace(git=git, make_repo=make_repo, commit=commit, reviews=reviews, closed_port=closed_port)


# -- control-plane processes -----------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running `starmesh control-plane` (`process`: what it printed) and its HTTP API at `url`."""

    process: Any
    url: str = ""

    def first_lines(self, count: int) -> list[str]:
        """Its first `count` lines, waiting for them."""
        found = self.process.wait_for(
            lambda lines: lines[:count] if len(lines) >= count else None, f"{count} lines", DEADLINE
        )
        return list(found)

    def wait_listening(self) -> str:
        """Wait for `listening HOST:PORT` and point `url` there; the address."""
        line = self.process.first_line(lambda line: line.startswith("listening "), "'listening' line", DEADLINE)
        address: str = line.removeprefix("listening ")
        self.url = f"http://{address}"
        return address

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=DEADLINE) as response:  # noqa: S310 - loopback
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: dict[str, Any]) -> int:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=DEADLINE) as response:  # noqa: S310 - loopback
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def status(self) -> dict[str, Any]:
        code, body = self.get("/v1/status")
        assert code == 200, body
        document: dict[str, Any] = json.loads(body)
        return document

    def wait_status(self, test: Callable[[dict[str, Any]], object], what: str) -> dict[str, Any]:
        end = time.monotonic() + DEADLINE
        while True:
            document = self.status()
            if test(document):
                return document
            if time.monotonic() > end:
                raise AssertionError(f"/v1/status never showed {what}: {document}")
            time.sleep(0.05)


mesh = e2e.mesh  # the fixture: a Mesh that stops (and checks) every process it started


class ControlPlanes:
    """Starts `starmesh control-plane` processes for one test in its `mesh`."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh

    def start(self, args: list[str], *, log: Path | None = None) -> ControlPlane:
        """`starmesh control-plane ARGS`, not waited for (`wait_listening` sets its `url`)."""
        return ControlPlane(self.mesh.start("control-plane", [str(STARMESH), "control-plane", *args], stderr=log))

    def replicas(
        self, ids: Sequence[str], *, repo: Path, key: Path, store: str, state: Path, leader_ttl: float = 2
    ) -> list[ControlPlane]:
        """Replicas `ids` of one control plane on the etcd at `store`, started in order, each
        listening on 127.0.0.1:0 (and advertising it) with its state in state/ID; the first is
        waited for until it leads, so that it is the leader and the others follow it."""
        planes: list[ControlPlane] = []
        for rid in ids:
            plane = self.start([
                "--repo", str(repo), "--key", str(key), "--state-dir", str(state / rid), "--listen", "127.0.0.1:0",
                "--store", store, "--replica-id", rid, "--leader-ttl", str(leader_ttl),
            ])  # fmt: skip
            plane.wait_listening()
            if not planes:
                plane.wait_status(lambda d: (d.get("control_plane") or {}).get("role") == "leader", f"{rid} leading")
            planes.append(plane)
        return planes


@pytest.fixture
def control_planes(mesh: Any) -> ControlPlanes:
    return ControlPlanes(mesh)


# -- fake control planes (in-process) --------------------------------------------------------


class FakeServer:
    """An aiohttp app on 127.0.0.1:0 in a background loop, answering every path with `handler`."""

    def __init__(self, handler: Callable[[web.Request], Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[web.AppRunner, str]:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            app_runner = web.AppRunner(app, access_log=None)
            await app_runner.setup()
            site = web.TCPSite(app_runner, "127.0.0.1", 0)
            await site.start()
            host, port = app_runner.addresses[0][:2]
            return app_runner, f"http://{host}:{port}"

        self.runner, self.url = asyncio.run_coroutine_threadsafe(start(), self.loop).result(DEADLINE)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


@pytest.fixture
def fake_server() -> Iterator[Callable[[Callable[[web.Request], Any]], FakeServer]]:
    """fake_server(handler): a started `FakeServer`; every one made is closed at teardown."""
    servers: list[FakeServer] = []

    def start(handler: Callable[[web.Request], Any]) -> FakeServer:
        servers.append(FakeServer(handler))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.close()
