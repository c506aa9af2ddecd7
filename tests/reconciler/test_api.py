"""The control plane's HTTP API in-process on 127.0.0.1:0, over a real ledger, issuer and registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from starmesh.bundle.release import verify_release
from starmesh.reconciler.api import ApiDeps, make_app
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.model import CompileStatus, ReleaseRecord
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout, RolloutPolicy
from starmesh.reconciler.store import FileStore

POLICY = """\
mesh(name = "shop", mtls = "disable", rollout = rollout(canary_percent = {percent}, max_failures = 5))
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""

HEARTBEAT = {
    "service": "reviews", "version": "v1", "address": "127.0.0.1:9081", "release_version": None, "bundle": None
}  # fmt: skip
BEAT_ANSWER = {"heartbeat_seconds": 10.0, "ttl_seconds": 30}
DEADLINE = 30.0  # seconds; a bound on waiting, never an assertion about speed


@dataclass
class Plane:
    h: Any
    tmp: Path
    keys: Any
    ledger: Ledger
    issuer: Issuer
    registry: Registry
    rollout: Rollout
    wall: Any  # h.Clock: the rollout's clock (NACK holds)
    not_ready: list[str | None] = field(default_factory=lambda: [None])

    def release(self, v1: int, percent: int = 0) -> ReleaseRecord:
        text = POLICY.format(percent=percent, v1=v1, v2=100 - v1)
        data = self.h.compile_policy(self.tmp / f"policy-{v1}-{percent}", text)
        record = self.issuer.issue(self.ledger.put_bundle(data), commit=f"c{v1}", reason="commit")
        self.rollout.start(record, RolloutPolicy.from_bundle(data))
        return record

    def deps(self) -> ApiDeps:
        return ApiDeps(
            ledger=self.ledger,
            registry=self.registry,
            rollout=self.rollout,
            last_compile=lambda: CompileStatus("c1", True, None, "2026-11-26T09:00:00.000Z"),
            ready=lambda: self.not_ready[0],
            extra_status=lambda: {"control_plane": {"id": "cp-1"}},
        )


@pytest.fixture
def plane(tmp_path: Path, h: Any) -> Plane:
    keys = h.keys(tmp_path / "keys")
    ledger = Ledger(FileStore(tmp_path / "state"))
    issuer = Issuer(ledger, keys.signer())
    registry = Registry(ttl=30, max_proxies=3, warmup=0)
    wall = h.Clock(1_800_000_000.0)
    return Plane(h, tmp_path, keys, ledger, issuer, registry, Rollout(ledger, issuer, registry, clock=wall), wall)


Check = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


async def serving(plane: Plane, check: Check, **options: Any) -> None:
    runner = web.AppRunner(make_app(plane.deps(), **options), access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        timeout = aiohttp.ClientTimeout(total=DEADLINE + 10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await check(session, f"http://{host}:{port}")
    finally:
        await runner.cleanup()


def serve(plane: Plane, check: Check, **options: Any) -> None:
    asyncio.run(serving(plane, check, **options))


async def answer(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    body = await response.read()
    if response.content_type == "application/json":
        return response.status, json.loads(body)
    return response.status, body.decode()


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"content-type": "application/json"}) as response:
        return await answer(response)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return await answer(response)


def test_health_and_readiness(plane: Plane) -> None:
    async def check(session: aiohttp.ClientSession, url: str) -> None:
        assert await get(session, url + "/healthz") == (200, "ok\n")
        assert await get(session, url + "/readyz") == (200, "ready\n")
        plane.not_ready[0] = "no release yet: commit 0123abcd was rejected"
        assert await get(session, url + "/readyz") == (503, "not ready: no release yet: commit 0123abcd was rejected\n")
        status, body = await get(session, url + "/v1/nothing")
        assert status == 404 and body == {"error": "Not Found: GET /v1/nothing"}

    serve(plane, check)


def test_heartbeats_and_their_refusals(plane: Plane) -> None:
    async def check(session: aiohttp.ClientSession, url: str) -> None:
        assert await post(session, url + "/v1/proxies/r1", HEARTBEAT) == (200, BEAT_ANSWER)
        assert plane.registry.live_ids() == ["r1"]

        refusals = [
            ("/v1/proxies/r1", b"{not json", 400, "the heartbeat is not JSON"),
            ("/v1/proxies/r1", {"service": "reviews"}, 400, "invalid heartbeat: Object missing required field"),
            ("/v1/proxies/r1", {**HEARTBEAT, "release_version": "7"}, 400, "Expected `int | null`, got `str`"),
            ("/v1/proxies/r1", {**HEARTBEAT, "service": "Reviews"}, 400, 'bad service: invalid name "Reviews"'),
            ("/v1/proxies/r1", {**HEARTBEAT, "address": "nowhere"}, 400, "bad address: invalid endpoint address"),
            ("/v1/proxies/bad%20id", HEARTBEAT, 400, "invalid proxy id 'bad id'"),
            ("/v1/proxies/" + "x" * 129, HEARTBEAT, 400, "invalid proxy id"),
            ("/v1/proxies/r1", {**HEARTBEAT, "service": "x" * 70_000}, 413, "the heartbeat is over 65536 bytes"),
        ]
        for path, body, code, message in refusals:
            status, document = await post(session, url + path, body)
            assert status == code and message in document["error"], (path, document)
        assert plane.registry.entries()[0].service == "reviews"  # nothing changed

        assert (await post(session, url + "/v1/proxies/r2", HEARTBEAT))[0] == 200
        assert (await post(session, url + "/v1/proxies/r3", HEARTBEAT))[0] == 200
        status, document = await post(session, url + "/v1/proxies/r4", HEARTBEAT)
        assert status == 503 and "holds 3 live proxies" in document["error"]

    serve(plane, check)


def test_status_reports_ack_and_nack(plane: Plane) -> None:
    first = plane.release(100)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        ack = {"version": first.version, "bundle": first.bundle, "error": None}
        status, document = await post(session, url + "/v1/proxies/r1/status", ack)
        assert status == 404 and "proxy r1 is not registered" in document["error"]
        assert (await post(session, url + "/v1/proxies/r1", HEARTBEAT))[0] == 200
        assert await post(session, url + "/v1/proxies/r1/status", ack) == (200, {"state": "synced"})
        assert await post(session, url + "/v1/proxies/r2", HEARTBEAT) == (200, BEAT_ANSWER)
        nack = {"version": first.version, "bundle": first.bundle, "error": "golden request 'x' failed"}
        assert await post(session, url + "/v1/proxies/r2/status", nack) == (200, {"state": "failed"})

        for body, message in [
            ({**ack, "bundle": "sha256:abc"}, "not sha256:<64 hex>"),
            ({**ack, "version": -1}, "versions are >= 0"),
            ({"bundle": first.bundle}, "missing required field `version`"),
            (b"{\"version\": 1", "is not JSON"),
        ]:
            status, document = await post(session, url + "/v1/proxies/r1/status", body)
            assert status == 400 and message in document["error"], document

        status, document = await get(session, url + "/v1/status")
        assert status == 200
        assert document["release"] == {"version": 1, "bundle": first.bundle, "previous": None, "commit": "c100", "reason": "commit"}
        assert document["last_compile"]["commit"] == "c1" and document["last_compile"]["ok"] is True
        assert document["control_plane"] == {"id": "cp-1"}
        proxies = {p["id"]: p for p in document["proxies"]}
        assert proxies["r1"]["state"] == "synced" and proxies["r1"]["release_version"] == 1
        assert proxies["r2"]["state"] == "failed" and proxies["r2"]["error"] == "golden request 'x' failed"
        assert set(proxies["r1"]) == {"id", "service", "version", "address", "release_version", "bundle", "state",
                                      "error", "last_seen", "last_seen_seconds_ago", "desired_release_version",
                                      "releases_behind", "request_rate"}  # fmt: skip
        assert document["rollout"]["version"] == 1 and document["rollout"]["phase"] == "complete"

    serve(plane, check)


def test_release_long_poll(plane: Plane) -> None:
    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "/v1/release?after=0&wait=0.1") as response:
            assert response.status == 204  # nothing released yet: 204 after the hold
        for query, message in [("after=-1", "after='-1'"), ("after=x", "after='x'"), ("wait=soon", "wait='soon'"),
                               ("wait=-1", "wait='-1'"), ("wait=nan", "wait='nan'"), ("proxy=a/b", "invalid proxy id")]:
            status, document = await get(session, url + "/v1/release?" + query)
            assert status == 400 and message in document["error"], document

        waiting = asyncio.ensure_future(session.get(url + "/v1/release?after=0&wait=30"))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        first = plane.release(100)
        async with await waiting as response:  # woken by the release, long before the 30 s hold
            assert response.status == 200
            assert response.headers["x-starmesh-release-version"] == str(first.version)
            assert response.content_type == "application/json"
            envelope = await response.read()
        assert envelope == first.envelope
        verified = verify_release(envelope, plane.keys.trusted(), applied_version=None, applied_digest=None,
                                  now=datetime.now(UTC))  # fmt: skip
        assert verified.release.version == first.version

        async with session.get(url + f"/v1/release?after={first.version}&wait=0.1") as response:
            assert response.status == 204

    serve(plane, check)


def test_release_by_proxy_in_a_staged_rollout(plane: Plane) -> None:
    for n in range(3):
        plane.registry.heartbeat(f"p{n}", "reviews", "v1", f"127.0.0.1:{9000 + n}", release_version=None, bundle=None)
    stable = plane.release(100)
    for n in range(3):
        plane.registry.report(f"p{n}", stable.version, stable.bundle, None)
        plane.rollout.on_report(f"p{n}", stable.version, stable.bundle, None)
    new = plane.release(50, percent=25)
    canaries: Any = plane.rollout.to_json()["canary"]
    (canary,) = canaries
    other = next(p for p in ["p0", "p1", "p2"] if p != canary)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + f"/v1/release?after=0&proxy={canary}") as response:
            assert response.headers["x-starmesh-release-version"] == str(new.version)
        async with session.get(url + f"/v1/release?after=0&proxy={other}") as response:
            assert response.headers["x-starmesh-release-version"] == str(stable.version)
        async with session.get(url + "/v1/release?after=0") as response:
            assert response.headers["x-starmesh-release-version"] == str(stable.version)
        async with session.get(url + f"/v1/release?after={stable.version}&proxy={other}&wait=0.1") as response:
            assert response.status == 204

    serve(plane, check)


def test_a_nacked_release_is_resent_only_after_the_backoff_hold(plane: Plane) -> None:
    first = plane.release(100)
    plane.registry.heartbeat("p1", "reviews", "v1", "127.0.0.1:9000", release_version=None, bundle=None)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        poll = url + "/v1/release?after=0&proxy=p1&wait=0.2"
        async with session.get(poll) as response:
            assert response.status == 200
        nack = {"version": first.version, "bundle": first.bundle, "error": "route table build failed"}
        assert (await post(session, url + "/v1/proxies/p1/status", nack))[0] == 200
        async with session.get(poll) as response:
            assert response.status == 204  # held: 1 s on the rollout's clock, which has not moved
        async with session.get(url + "/v1/release?after=0&wait=0.2") as response:
            assert response.status == 200  # other clients are not held
        plane.wall.now += 1
        async with session.get(poll) as response:
            assert response.status == 200
        assert (await post(session, url + "/v1/proxies/p1/status", nack))[0] == 200
        plane.wall.now += 1
        async with session.get(poll) as response:
            assert response.status == 204  # the second NACK in a row holds 2 s
        plane.wall.now += 1
        async with session.get(poll) as response:
            assert response.status == 200

        async with session.get(poll) as response:
            assert response.status == 200
        assert (await post(session, url + "/v1/proxies/p1/status", nack))[0] == 200
        waiting = asyncio.ensure_future(session.get(url + "/v1/release?after=0&proxy=p1&wait=30"))
        await asyncio.sleep(0.1)
        second = plane.release(40)  # a newer release ends the hold at once
        async with await waiting as response:
            assert response.headers["x-starmesh-release-version"] == str(second.version)

    serve(plane, check)


def test_bundles(plane: Plane) -> None:
    first = plane.release(100)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + f"/v1/bundles/{first.bundle}") as response:
            assert response.status == 200
            assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert "sha256:" + hashlib.sha256(await response.read()).hexdigest() == first.bundle
        unknown = "sha256:" + hashlib.sha256(b"never compiled").hexdigest()
        status, document = await get(session, url + f"/v1/bundles/{unknown}")
        assert status == 404 and unknown in document["error"]
        status, document = await get(session, url + "/v1/bundles/sha256:ABC")
        assert status == 400 and "is not a bundle digest" in document["error"]

    serve(plane, check)


def test_endpoints_long_poll(plane: Plane) -> None:
    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "/v1/endpoints?after=0&wait=0.1") as response:
            assert response.status == 204
        assert (await post(session, url + "/v1/proxies/r1", HEARTBEAT))[0] == 200
        assert await get(session, url + "/v1/endpoints?after=0") == (
            200, {"version": 1, "endpoints": {"reviews": {"v1": ["127.0.0.1:9081"]}}}
        )  # fmt: skip
        waiting = asyncio.ensure_future(session.get(url + "/v1/endpoints?after=1&wait=30"))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        second = {**HEARTBEAT, "version": "v2", "address": "[::1]:9082"}
        assert (await post(session, url + "/v1/proxies/r2", second))[0] == 200
        async with await waiting as response:
            assert await response.json() == {
                "version": 2, "endpoints": {"reviews": {"v1": ["127.0.0.1:9081"], "v2": ["[::1]:9082"]}}
            }  # fmt: skip
        status, document = await get(session, url + "/v1/endpoints?after=1.5")
        assert status == 400 and "after='1.5'" in document["error"]

    serve(plane, check)


def test_rollback(plane: Plane) -> None:
    old = plane.release(100)
    plane.release(0)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        unknown = "sha256:" + hashlib.sha256(b"never compiled").hexdigest()
        status, document = await post(session, url + "/v1/rollback", {"to": unknown})
        assert status == 404 and f"cannot roll back to {unknown}" in document["error"]
        for body, message in [({"to": "sha256:abc"}, "is not a bundle digest"), ({"digest": old.bundle}, "`to`"),
                              (b"nope", "not JSON")]:  # fmt: skip
            status, document = await post(session, url + "/v1/rollback", body)
            assert status == 400 and message in document["error"], document
        current = plane.ledger.current()
        assert current is not None and current.version == 2

        status, document = await post(session, url + "/v1/rollback", {"to": old.bundle})
        assert status == 200
        assert document["release"]["version"] == 3 and document["release"]["bundle"] == old.bundle
        assert document["release"]["reason"] == "rollback"
        async with session.get(url + "/v1/release?after=2") as response:
            assert response.headers["x-starmesh-release-version"] == "3"

    serve(plane, check)


def test_long_polls_are_bounded_and_end_at_shutdown(plane: Plane) -> None:
    async def main() -> None:
        held: list[asyncio.Future[aiohttp.ClientResponse]] = []
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE))
        runner = web.AppRunner(make_app(plane.deps(), max_long_polls=2), access_log=None, shutdown_timeout=DEADLINE)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            url = f"http://{host}:{port}"
            held.append(asyncio.ensure_future(session.get(url + "/v1/release?wait=300")))
            held.append(asyncio.ensure_future(session.get(url + "/v1/endpoints?wait=300")))
            end = asyncio.get_running_loop().time() + DEADLINE
            while True:  # a third is refused once the two are held (wait=0: it never holds a slot itself)
                status, document = await get(session, url + "/v1/release?wait=0")
                if status == 503 or asyncio.get_running_loop().time() > end:
                    break
            assert status == 503 and "2 long-polls are held already" in document["error"]
            assert not any(future.done() for future in held)
            await runner.cleanup()  # shutdown ends every hold: 204, not a 300 s wait or a cut connection
            for future in held:
                async with await future as response:
                    assert response.status == 204
        finally:
            for future in held:
                future.cancel()
            await runner.cleanup()
            await session.close()

    asyncio.run(main())
