"""Simulated proxies (runtime/fleet.py) against a real control plane, and against a lying one.

    fleet of 200 ──HTTP──► starmesh control-plane (plain HTTP, --state-dir) ◄── Git repo in tmp
      register, long-poll, fetch once per digest, verify, ACK ─► /v1/status: all synced
    fleet of 60, and of 1,000 ──► three replicas on a real etcd: every replica lists them all synced

The fleet runs in the test's own uvloop loop; the control plane is a real process
(the `mesh` fixture stops it and checks it exited 0), or three replicas on a real etcd
(`etcd_server`). No timing is asserted: waits are
bounded by deadlines only.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from aiohttp import web

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.keys import generate_keypair, load_private_key, load_public_key
from starmesh.bundle.release import issue_release
from starmesh.runtime.control_http import ControlLimits
from starmesh.runtime.fleet import Fleet, FleetConfig, FleetError, ensure_open_files, fleet_address

T = TypeVar("T")

DEADLINE = 60.0
"""Seconds a fleet may take to register or converge: a bound on waiting, not a speed assertion."""

POLICY = """\
mesh(name = "fleet-test", mtls = "disable")

service(name = "app", versions = ["v1", "v2"])

service(name = "fleet", versions = ["v1"])

http_route("app", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=tests", "-c", "user.email=tests@starmesh.invalid",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def _commit(repo: Path, v2: int) -> str:
    (repo / "mesh.star").write_text(POLICY.format(v1=100 - v2, v2=v2))
    _git(repo, "add", "mesh.star")
    _git(repo, "commit", "-q", "-m", f"v2 at {v2}%")
    return _git(repo, "rev-parse", "HEAD")


def _run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return uvloop.run(main())


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/status", timeout=DEADLINE) as answer:  # noqa: S310 - loopback
        document: dict[str, Any] = json.loads(answer.read())
    return document


class _Plane:
    """A control plane process on a repo of its own, with its signing keys."""

    def __init__(self, mesh: Any, tmp_path: Path) -> None:
        self.repo = tmp_path / "repo"
        self.repo.mkdir()
        _git(self.repo, "init", "-q", "-b", "main")
        self.commits = [_commit(self.repo, 0)]
        private, self.public = generate_keypair(tmp_path / "keys")
        self.process = mesh.start("control-plane", [
            sys.executable, "-m", "starmesh.cli", "control-plane", "--repo", str(self.repo), "--key", str(private),
            "--state-dir", str(tmp_path / "cp"), "--listen", "127.0.0.1:0",
        ])  # fmt: skip
        line = self.process.first_line(lambda line: line.startswith("listening "), "its address")
        self.url = "http://" + line.split()[1]
        self.process.first_line(lambda line: line.startswith("ready "), "readiness")

    def fleet(self, size: int, *, urls: tuple[str, ...] | None = None, trust: Path | None = None) -> Fleet:
        return Fleet(FleetConfig(size=size, control_planes=urls or (self.url,),
                                 trusted=(load_public_key(trust or self.public),), seed=7))  # fmt: skip


@pytest.fixture
def plane(mesh: Any, tmp_path: Path) -> Iterator[_Plane]:
    yield _Plane(mesh, tmp_path)


@pytest.mark.slow
def test_a_fleet_of_200_follows_two_releases_fetching_each_bundle_once(plane: _Plane) -> None:
    async def scenario() -> tuple[list[Any], Any, dict[str, Any]]:
        async with plane.fleet(200) as fleet:
            await fleet.wait_registered(DEADLINE)
            await fleet.wait_converged(1, DEADLINE)
            plane.commits.append(await asyncio.to_thread(_commit, plane.repo, 30))
            await fleet.wait_converged(2, DEADLINE)
            status = await asyncio.to_thread(_status, plane.url)
            return fleet.snapshots(), fleet.totals(), status

    snapshots, totals, status = _run(scenario)
    release = status["release"]
    assert (release["version"], release["commit"]) == (2, plane.commits[1])
    assert {s.bundle for s in snapshots} == {release["bundle"]}
    for snapshot in snapshots:
        assert (snapshot.release_version, snapshot.acked_version, snapshot.acked_bundle) == (2, 2, release["bundle"])
        # Two releases, two digests, each fetched exactly once by each proxy.
        assert len(snapshot.fetched) == 2 and set(snapshot.fetched.values()) == {1}, snapshot
        assert release["bundle"] in snapshot.fetched
        assert (snapshot.nacks, snapshot.last_error, snapshot.failovers) == (0, None, 0)
    assert (totals.proxies, totals.registered, totals.fetches, totals.acks) == (200, 200, 400, 400)
    fleet_rows = [p for p in status["proxies"] if p["service"] == "fleet"]
    assert len(fleet_rows) == 200
    assert {(p["state"], p["release_version"], p["bundle"]) for p in fleet_rows} == {("synced", 2, release["bundle"])}
    assert len({p["id"] for p in fleet_rows}) == 200


@pytest.mark.slow
def test_proxies_that_trust_another_key_nack_and_show_failed(plane: _Plane, tmp_path: Path) -> None:
    _, stranger = generate_keypair(tmp_path / "other-keys")

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        async with plane.fleet(20, trust=stranger) as fleet:
            await fleet.wait_registered(DEADLINE)
            loop = asyncio.get_running_loop()
            end = loop.time() + DEADLINE
            while True:  # the control plane shows every one of them failed
                status = await asyncio.to_thread(_status, plane.url)
                rows = [p for p in status["proxies"] if p["service"] == "fleet"]
                if len(rows) == 20 and all(p["state"] == "failed" for p in rows) or loop.time() > end:
                    return fleet.snapshots(), status
                await asyncio.sleep(0.1)

    snapshots, status = _run(scenario)
    rows = [p for p in status["proxies"] if p["service"] == "fleet"]
    assert len(rows) == 20 and {p["state"] for p in rows} == {"failed"}, rows
    assert all("refused" in p["error"] and "sign" in p["error"].lower() for p in rows), rows[0]["error"]
    for snapshot in snapshots:
        assert snapshot.nacks >= 1 and snapshot.acks == 0 and snapshot.fetches == 0, snapshot
        assert (snapshot.release_version, snapshot.acked_version) == (None, None)


@pytest.mark.slow
def test_proxies_fail_over_from_a_dead_url_to_the_live_one(plane: _Plane) -> None:
    dead = f"http://{fleet_address(0).replace(':9', ':1')}"  # loopback, nothing listens on port 1

    async def scenario() -> tuple[list[Any], Any]:
        fleet = Fleet(FleetConfig(size=10, control_planes=(dead, plane.url), trusted=(load_public_key(plane.public),),
                                  limits=ControlLimits(backoff_base=0.05, backoff_cap=0.2), seed=3))  # fmt: skip
        async with fleet:
            await fleet.wait_converged(1, DEADLINE)
            return fleet.snapshots(), fleet.totals()

    snapshots, totals = _run(scenario)
    first_dead = [s for s in snapshots if s.urls[0] == dead]
    assert len(first_dead) == 5  # the URL order is rotated per proxy: half start on each
    assert all(s.failovers >= 1 for s in first_dead)
    assert totals.registered == 10 and totals.nacks == 0


@pytest.mark.slow
@pytest.mark.parametrize("size", [60, 1000])
def test_a_fleet_spread_over_three_replicas_on_etcd_follows_a_release(
    mesh: Any, tmp_path: Path, etcd_server: Any, size: int
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * size:  # the fleet's connections, in this process
        pytest.skip(f"{size} simulated proxies need about {3 * size} open files; the hard limit here is {hard}")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _commit(repo, 0)
    private, public = generate_keypair(tmp_path / "keys")
    urls = []
    for i in (1, 2, 3):
        process = mesh.start(f"replica r{i}", [
            sys.executable, "-m", "starmesh.cli", "control-plane", "--repo", str(repo), "--key", str(private),
            "--state-dir", str(tmp_path / f"cp-{i}"), "--listen", "127.0.0.1:0", "--store", etcd_server.url,
            "--replica-id", f"r{i}",
        ])  # fmt: skip
        urls.append("http://" + process.first_line(lambda line: line.startswith("listening "), "its address").split()[1])
        process.first_line(lambda line: line.startswith("ready "), "readiness")

    async def scenario() -> tuple[list[Any], list[dict[str, Any]]]:
        fleet = Fleet(FleetConfig(size=size, control_planes=tuple(urls), trusted=(load_public_key(public),), seed=5))
        async with fleet:
            await fleet.wait_converged(1, DEADLINE)
            commit = await asyncio.to_thread(_commit, repo, 50)
            await fleet.wait_converged(2, DEADLINE)
            loop = asyncio.get_running_loop()
            end = loop.time() + DEADLINE
            while True:  # every replica learns every ACK (through etcd)
                statuses = [await asyncio.to_thread(_status, url) for url in urls]
                done = all(sum(p["state"] == "synced" for p in s["proxies"]) == size for s in statuses)
                if done or loop.time() > end:
                    assert all(s["release"]["commit"] == commit for s in statuses)
                    return fleet.snapshots(), statuses
                await asyncio.sleep(0.05)

    snapshots, statuses = _run(scenario)
    assert {s.urls[0] for s in snapshots} == set(urls)  # spread: each replica is first for a third
    for snapshot in snapshots:
        assert snapshot.acked_version == 2 and set(snapshot.fetched.values()) == {1} and len(snapshot.fetched) == 2
    for status in statuses:
        rows = [p for p in status["proxies"] if p["service"] == "fleet"]
        assert len(rows) == size and {(p["state"], p["release_version"]) for p in rows} == {("synced", 2)}, status
        assert {r["id"] for r in status["control_plane"]["replicas"]} == {"r1", "r2", "r3"}


# -- against an in-process control plane that lies about a bundle ------------------------------


def test_a_bundle_that_does_not_hash_to_its_digest_is_nacked_and_never_acked(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    bundle = b'{"the": "real bundle"}'
    envelope = issue_release(mesh="m", version=1, bundle=digest_of(bundle), previous=None, commit=None,
                             key=load_private_key(private), now=datetime.now(UTC)).envelope  # fmt: skip
    reports: list[dict[str, Any]] = []
    fetches: list[str] = []

    async def release(request: web.Request) -> web.Response:
        if request.query.get("after") == "0":
            return web.Response(body=envelope, headers={"x-starmesh-release-version": "1"})
        await asyncio.sleep(float(request.query.get("wait", "0")))
        return web.Response(status=204)

    async def bundle_bytes(request: web.Request) -> web.Response:
        fetches.append(request.match_info["digest"])
        return web.Response(body=b'{"a": "tampered bundle"}')

    async def heartbeat(request: web.Request) -> web.Response:
        return web.json_response({"heartbeat_seconds": 5})

    async def report(request: web.Request) -> web.Response:
        reports.append(await request.json())
        return web.json_response({})

    async def scenario() -> list[Any]:
        app = web.Application()
        app.router.add_get("/v1/release", release)
        app.router.add_get("/v1/bundles/{digest}", bundle_bytes)
        app.router.add_post("/v1/proxies/{id}", heartbeat)
        app.router.add_post("/v1/proxies/{id}/status", report)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with Fleet(FleetConfig(size=3, control_planes=(f"http://{host}:{port}",),
                                         trusted=(load_public_key(public),))) as fleet:  # fmt: skip
                end = asyncio.get_running_loop().time() + DEADLINE
                while len(reports) < 3 and asyncio.get_running_loop().time() < end:
                    await asyncio.sleep(0.02)
                return fleet.snapshots()
        finally:
            await runner.cleanup()

    snapshots = _run(scenario)
    assert len(reports) >= 3
    assert all(r["version"] == 1 and r["bundle"] == digest_of(bundle) and "digest mismatch" in r["error"] for r in reports)
    assert fetches and set(fetches) == {digest_of(bundle)}
    for snapshot in snapshots:
        assert (snapshot.release_version, snapshot.acked_version, snapshot.acks) == (None, None, 0)
        assert snapshot.nacks >= 1 and "digest mismatch" in (snapshot.last_error or "")


# -- the pieces -------------------------------------------------------------------------------


def test_addresses_are_distinct_loopback_endpoints_and_bounded() -> None:
    addresses = [fleet_address(i) for i in range(2000)]
    assert len(set(addresses)) == 2000
    assert all(a.startswith("127.254.") and a.endswith(":9") for a in addresses)
    with pytest.raises(ValueError, match="at most"):
        fleet_address(250 * 256)


def test_a_fleet_past_the_hard_open_file_limit_is_refused_with_the_limit_named() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(FleetError, match=f"hard limit is {hard}"):
        ensure_open_files(hard + 1)
    assert ensure_open_files(min(soft, 10)) == soft  # enough already: nothing changes
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


def test_a_fleet_needs_a_size_a_url_and_a_key(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "keys")
    key = load_public_key(public)
    for config, message in ((FleetConfig(size=0, control_planes=("http://127.0.0.1:1",), trusted=(key,)), "1 to"),
                            (FleetConfig(size=1, control_planes=(), trusted=(key,)), "control-plane URL"),
                            (FleetConfig(size=1, control_planes=("http://127.0.0.1:1",), trusted=()), "public key")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Fleet(config)
    with pytest.raises(FleetError, match="not been started"):
        Fleet(FleetConfig(size=1, control_planes=("http://127.0.0.1:1",), trusted=(key,))).totals()
