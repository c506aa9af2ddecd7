"""The ControlPlane wired whole, in process: a real repo, keys, state dir and HTTP API.

    commit ──watchdog──► Reconciler ──► Ledger/Rollout ──► api on 127.0.0.1:0 ◄── aiohttp client

The process form (signals, exit codes, the CLI) is tested in
tests/cli/test_control_plane_cli.py. Waits poll with a deadline; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, verify_envelope
from starmesh.bundle.keys import generate_keypair, load_public_key
from starmesh.bundle.release import decode_release
from starmesh.reconciler.errors import ReconcilerError
from starmesh.reconciler.service import ControlPlane, ControlPlaneConfig

DEADLINE = 30.0

POLICY = """\
mesh(name = "shop", mtls = "disable")
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{to}": 100}})])
request_test(name = "default route", service = "api", backends = "{to}")
"""


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def commit(repo: Path, text: str) -> str:
    (repo / "mesh.star").write_text(text)
    git(repo, "add", "mesh.star")
    git(repo, "commit", "-q", "-m", "policy")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "policy"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "starmesh tests")
    git(repo, "config", "user.email", "tests@starmesh.invalid")
    git(repo, "config", "commit.gpgsign", "false")
    key, _ = generate_keypair(tmp_path / "keys")
    return repo, key


def config(tmp_path: Path, repo: str, key: Path, **kw: Any) -> ControlPlaneConfig:
    return ControlPlaneConfig(repo=repo, key=key, state_dir=tmp_path / "state", listen="127.0.0.1:0", **kw)


class Running:
    """A started ControlPlane, what it printed, and an HTTP client for its API."""

    def __init__(self, plane: ControlPlane, out: io.StringIO, http: aiohttp.ClientSession) -> None:
        self.plane, self.out, self.http = plane, out, http

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    async def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        async with self.http.get(f"http://{self.plane.address}{path}") as response:
            return response.status, await response.read(), dict(response.headers)

    async def status(self) -> dict[str, Any]:
        async with self.http.get(f"http://{self.plane.address}/v1/status") as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body


@asynccontextmanager
async def running(cfg: ControlPlaneConfig) -> AsyncIterator[Running]:
    out = io.StringIO()
    plane = ControlPlane(cfg, out=out)
    try:
        await plane.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
            yield Running(plane, out, http)
    finally:
        await plane.stop()


async def until(test: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        outcome = test()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_it_listens_releases_the_tip_and_follows_commits(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    repo, key = setup
    first = commit(repo, POLICY.format(to="v1"))
    public = load_public_key(key.with_name("signing.pub"))

    async def main() -> None:
        async with running(config(tmp_path, str(repo), key, poll_interval=3600)) as cp:
            await until(lambda: len(cp.lines()) >= 2, "the ready line")
            listening, ready = cp.lines()[:2]
            assert listening == f"listening {cp.plane.address}" and str(cp.plane.address).startswith("127.0.0.1:")
            assert ready.startswith("ready release 1 sha256:")
            assert (await cp.get("/readyz"))[0] == 200
            status = await cp.status()
            assert status["release"]["version"] == 1 and status["release"]["commit"] == first
            assert status["last_compile"]["ok"] is True and status["last_compile"]["commit"] == first
            assert status["reconciler"]["phase"] == "idle"
            code, envelope, headers = await cp.get("/v1/release?after=0&wait=1")
            assert code == 200 and headers["x-starmesh-release-version"] == "1"
            release = decode_release(verify_envelope(envelope, [public], payload_type=RELEASE_PAYLOAD_TYPE))
            assert (release.version, release.commit) == (1, first)
            bundle_code, data, _ = await cp.get(f"/v1/bundles/{release.bundle}")
            assert bundle_code == 200 and first.encode() in data

            second = await asyncio.to_thread(commit, repo, POLICY.format(to="v2"))  # watchdog, not the poll

            async def released() -> bool:
                return bool((await cp.status())["release"]["commit"] == second)

            await until(released, "the release of the second commit")
            assert (await cp.status())["release"]["version"] == 2
            assert len(cp.lines()) == 2, "ready is said once"

    run(main)


def test_not_ready_until_a_commit_compiles(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    repo, key = setup
    bad = commit(repo, 'mesh(name = "shop"\n')

    async def main() -> None:
        async with running(config(tmp_path, str(repo), key, poll_interval=3600)) as cp:
            await until(lambda: len(cp.lines()) >= 2, "the status line")
            assert cp.lines()[1].startswith(f"not ready: no release yet: commit {bad[:12]} was rejected")
            code, body, _ = await cp.get("/readyz")
            assert code == 503 and b"rejected" in body
            status = await cp.status()
            assert status["release"] is None
            diagnostics = status["last_compile"]["diagnostics"]
            assert status["last_compile"]["ok"] is False and diagnostics
            assert diagnostics[0]["file"] == "mesh.star" and diagnostics[0]["line"] >= 1
            await asyncio.to_thread(commit, repo, POLICY.format(to="v1"))
            await until(lambda: len(cp.lines()) >= 3, "the ready line")
            assert cp.lines()[2].startswith("ready release 1 sha256:")
            assert (await cp.get("/readyz"))[0] == 200

    run(main)


def test_a_restart_is_ready_from_the_store_and_keeps_counting(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    repo, key = setup
    commit(repo, POLICY.format(to="v1"))

    async def main() -> None:
        async with running(config(tmp_path, str(repo), key, poll_interval=3600)) as cp:
            await until(lambda: len(cp.lines()) >= 2, "the first ready line")
        third = await asyncio.to_thread(commit, repo, 'mesh(name = "shop"\n')  # rejected after the restart
        async with running(config(tmp_path, str(repo), key, poll_interval=3600)) as cp:
            await until(lambda: len(cp.lines()) >= 2, "the ready line after the restart")
            assert cp.lines()[1].startswith("ready release 1 sha256:"), "the stored release serves"
            status = await cp.status()
            assert status["last_compile"]["commit"] == third and status["last_compile"]["ok"] is False
            fourth = await asyncio.to_thread(commit, repo, POLICY.format(to="v2"))

            async def released() -> bool:
                return bool((await cp.status())["release"]["commit"] == fourth)

            await until(released, "the release after the restart")
            assert (await cp.status())["release"]["version"] == 2

    run(main)


def test_a_url_is_mirrored_and_polled(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    repo, key = setup
    commit(repo, POLICY.format(to="v1"))

    async def main() -> None:
        async with running(config(tmp_path, repo.as_uri(), key, poll_interval=0.1)) as cp:
            await until(lambda: len(cp.lines()) >= 2, "the ready line")
            assert cp.lines()[1].startswith("ready release 1 ")
            assert (tmp_path / "state" / "mirror.git" / "HEAD").is_file()
            second = await asyncio.to_thread(commit, repo, POLICY.format(to="v2"))

            async def released() -> bool:
                return bool((await cp.status())["release"]["commit"] == second)

            await until(released, "the release of the fetched commit")

    run(main)


def test_a_busy_listen_address_is_an_error(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    repo, key = setup
    commit(repo, POLICY.format(to="v1"))

    async def main() -> None:
        async with running(config(tmp_path, str(repo), key, poll_interval=3600)) as cp:
            taken = ControlPlane(
                ControlPlaneConfig(repo=str(repo), key=key, state_dir=tmp_path / "other", listen=cp.plane.address or ""),
                out=io.StringIO(),
            )
            with pytest.raises(ReconcilerError, match="cannot listen"):
                await taken.start()
            await taken.stop()

    run(main)
