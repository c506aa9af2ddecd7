"""The ControlPlane wired whole, in process: a real repo, keys, state dir and HTTP API.

    commit ──watchdog──► Reconciler ──► Ledger/Rollout ──► api on 127.0.0.1:0 ◄── aiohttp client

With `ca=` and `join_token=` the API is HTTPS with a mesh-CA certificate (the issuing and
client-certificate checks are in test_certificates.py). The process form (signals, exit
codes, the CLI) is tested in
tests/cli/test_control_plane_cli.py. Waits poll with a deadline; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, verify_envelope
from starmesh.bundle.release import decode_release
from starmesh.reconciler.ca import init_ca
from starmesh.reconciler.errors import ReconcilerError
from starmesh.reconciler.service import ControlPlane, ControlPlaneConfig

DEADLINE = 30.0  # seconds an HTTP request may take: a bound, never an assertion about speed
BROKEN = 'mesh(name = "shop"\n'  # a syntax error: the commit is rejected


@pytest.fixture
def setup(tmp_path: Path, h: Any) -> tuple[Path, Any]:
    """A policy repository with nothing committed yet, and a signing key pair."""
    return h.make_repo(tmp_path / "policy"), h.keys(tmp_path / "keys")


def config(tmp_path: Path, repo: str, keys: Any, **kw: Any) -> ControlPlaneConfig:
    return ControlPlaneConfig(repo=repo, key=keys.private, state_dir=tmp_path / "state", listen="127.0.0.1:0", **kw)


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

    async def releases(self, commit: str) -> bool:
        """Whether the current release is of `commit` (for `h.until`)."""
        return bool((await self.status())["release"]["commit"] == commit)


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


def test_it_listens_releases_the_tip_and_follows_commits(tmp_path: Path, setup: tuple[Path, Any], h: Any) -> None:
    repo, keys = setup
    first = h.commit(repo, {"mesh.star": h.policy("v1")})

    async def main() -> None:
        async with running(config(tmp_path, str(repo), keys, poll_interval=3600)) as cp:
            await h.until(lambda: len(cp.lines()) >= 2, "the ready line")
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
            release = decode_release(verify_envelope(envelope, keys.trusted(), payload_type=RELEASE_PAYLOAD_TYPE))
            assert (release.version, release.commit) == (1, first)
            bundle_code, data, _ = await cp.get(f"/v1/bundles/{release.bundle}")
            assert bundle_code == 200 and first.encode() in data

            second = await asyncio.to_thread(h.commit, repo, {"mesh.star": h.policy("v2")})  # watchdog, not the poll
            await h.until(lambda: cp.releases(second), "the release of the second commit")
            assert (await cp.status())["release"]["version"] == 2
            assert len(cp.lines()) == 2, "ready is said once"

    h.run(main)


def test_not_ready_until_a_commit_compiles(tmp_path: Path, setup: tuple[Path, Any], h: Any) -> None:
    repo, keys = setup
    bad = h.commit(repo, {"mesh.star": BROKEN})

    async def main() -> None:
        async with running(config(tmp_path, str(repo), keys, poll_interval=3600)) as cp:
            await h.until(lambda: len(cp.lines()) >= 2, "the status line")
            assert cp.lines()[1].startswith(f"not ready: no release yet: commit {bad[:12]} was rejected")
            code, body, _ = await cp.get("/readyz")
            assert code == 503 and b"rejected" in body
            status = await cp.status()
            assert status["release"] is None
            diagnostics = status["last_compile"]["diagnostics"]
            assert status["last_compile"]["ok"] is False and diagnostics
            assert diagnostics[0]["file"] == "mesh.star" and diagnostics[0]["line"] >= 1
            await asyncio.to_thread(h.commit, repo, {"mesh.star": h.policy("v1")})
            await h.until(lambda: len(cp.lines()) >= 3, "the ready line")
            assert cp.lines()[2].startswith("ready release 1 sha256:")
            assert (await cp.get("/readyz"))[0] == 200

    h.run(main)


def test_a_restart_is_ready_from_the_store_and_keeps_counting(tmp_path: Path, setup: tuple[Path, Any], h: Any) -> None:
    repo, keys = setup
    h.commit(repo, {"mesh.star": h.policy("v1")})

    async def main() -> None:
        async with running(config(tmp_path, str(repo), keys, poll_interval=3600)) as cp:
            await h.until(lambda: len(cp.lines()) >= 2, "the first ready line")
        third = await asyncio.to_thread(h.commit, repo, {"mesh.star": BROKEN})  # rejected after the restart
        async with running(config(tmp_path, str(repo), keys, poll_interval=3600)) as cp:
            await h.until(lambda: len(cp.lines()) >= 2, "the ready line after the restart")
            assert cp.lines()[1].startswith("ready release 1 sha256:"), "the stored release serves"
            status = await cp.status()
            assert status["last_compile"]["commit"] == third and status["last_compile"]["ok"] is False
            fourth = await asyncio.to_thread(h.commit, repo, {"mesh.star": h.policy("v2")})
            await h.until(lambda: cp.releases(fourth), "the release after the restart")
            assert (await cp.status())["release"]["version"] == 2

    h.run(main)


def test_a_url_is_mirrored_and_polled(tmp_path: Path, setup: tuple[Path, Any], h: Any) -> None:
    repo, keys = setup
    h.commit(repo, {"mesh.star": h.policy("v1")})

    async def main() -> None:
        async with running(config(tmp_path, repo.as_uri(), keys, poll_interval=0.1)) as cp:
            await h.until(lambda: len(cp.lines()) >= 2, "the ready line")
            assert cp.lines()[1].startswith("ready release 1 ")
            assert (tmp_path / "state" / "mirror.git" / "HEAD").is_file()
            second = await asyncio.to_thread(h.commit, repo, {"mesh.star": h.policy("v2")})
            await h.until(lambda: cp.releases(second), "the release of the fetched commit")

    h.run(main)


def test_a_busy_listen_address_is_an_error(tmp_path: Path, setup: tuple[Path, Any], h: Any) -> None:
    repo, keys = setup
    h.commit(repo, {"mesh.star": h.policy("v1")})

    async def main() -> None:
        async with running(config(tmp_path, str(repo), keys, poll_interval=3600)) as cp:
            taken = ControlPlane(
                ControlPlaneConfig(
                    repo=str(repo), key=keys.private, state_dir=tmp_path / "other", listen=cp.plane.address or ""
                ),
                out=io.StringIO(),
            )
            with pytest.raises(ReconcilerError, match="cannot listen"):
                await taken.start()
            await taken.stop()

    h.run(main)


# -- mesh identity: --ca and --join-token ----------------------------------------------------

TOKEN = "join-token-0123456789abcdef"


def test_with_a_ca_it_serves_https_with_a_mesh_certificate(tmp_path: Path, setup: tuple[Path, Any], h: Any) -> None:
    repo, keys = setup
    h.commit(repo, {"mesh.star": h.policy("v1")})
    init_ca("cluster.local", tmp_path / "ca")
    trusting = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))  # hostname checked too

    async def main() -> None:
        cfg = config(tmp_path, str(repo), keys, poll_interval=3600, ca=tmp_path / "ca", join_token=TOKEN)
        async with running(cfg) as cp:
            await h.until(lambda: len(cp.lines()) >= 2, "the ready line")
            assert cp.lines()[0] == f"listening {cp.plane.address}"
            async with cp.http.get(f"https://{cp.plane.address}/readyz", ssl=trusting) as response:
                assert response.status == 200 and await response.text() == "ready\n"
            host, _, port = str(cp.plane.address).rpartition(":")
            pem = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))
            names = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
            assert ipaddress.ip_address("127.0.0.1") in names.value.get_values_for_type(x509.IPAddress)
            assert names.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/control-plane"]
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                await cp.get("/readyz")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # nor trusted without ca.crt
                async with cp.http.get(f"https://{cp.plane.address}/readyz", ssl=ssl.create_default_context()):
                    pass

    h.run(main)


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        ({"ca": "ca"}, "--ca and --join-token go together"),
        ({"join_token": TOKEN}, "--ca and --join-token go together"),
        ({"ca": "ca", "join_token": "short"}, "--join-token is 5 characters; give at least 16"),
        ({"ca": "nowhere", "join_token": TOKEN}, "ca.crt: no such file; create one with `starmesh ca init"),
    ],
)
def test_mesh_identity_settings_are_checked(
    tmp_path: Path, setup: tuple[Path, Any], identity: dict[str, str], message: str
) -> None:
    repo, keys = setup
    init_ca("cluster.local", tmp_path / "ca")
    settings: dict[str, Any] = {k: tmp_path / v if k == "ca" else v for k, v in identity.items()}
    with pytest.raises(ReconcilerError) as refused:
        ControlPlane(config(tmp_path, str(repo), keys, **settings), out=io.StringIO())
    assert message in str(refused.value)
