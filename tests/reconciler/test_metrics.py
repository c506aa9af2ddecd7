"""The control plane's metrics: counted by the real parts, scraped from `GET /metrics`.

    commit ──► Reconciler.reconcile() ──► Issuer ──► Rollout        ControlPlaneMetrics
    proxies ──HTTP──► make_app (heartbeat, ACK/NACK, rollback) ──► Registry   ◄── events
    test ──GET /metrics──► Prometheus text ──► prometheus_client's parser ──► exact values

Every part is the real one: a Git repository in tmp_path, the compiler, a FileStore, Ed25519
keys, the API on 127.0.0.1:0. Heartbeats carry `requests_total`; `/v1/status` shows each
proxy's request rate, age and how far behind it is (the registry's clock is moved by hand).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from starmesh.reconciler.api import ApiDeps, make_app
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import ControlPlaneMetrics, RolloutProgress
from starmesh.reconciler.reconcile import Reconciler
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout
from starmesh.reconciler.source import RepoSource
from starmesh.reconciler.store import FileStore

DEADLINE = 30.0  # seconds; a bound on waiting, never an assertion about speed

STAGED = """\
mesh(name = "shop", mtls = "disable", rollout = rollout(canary_percent = 50, max_failures = 5))
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {"v2": 100})])
"""

BROKEN = 'mesh(name = "shop"\nservice(name = "api")\n'


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {key}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


class Plane:
    """A control plane's parts in-process, sharing one ControlPlaneMetrics, and its API."""

    def __init__(self, tmp: Path, h: Any) -> None:
        self.h = h
        self.repo = h.make_repo(tmp / "policy")
        self.clock = h.Clock(1000.0)  # the registry's (monotonic) clock
        self.metrics = ControlPlaneMetrics()
        self.ledger = Ledger(FileStore(tmp / "state" / "store"))
        self.issuer = Issuer(self.ledger, h.keys(tmp / "keys").signer(), metrics=self.metrics)
        self.registry = Registry(ttl=30, warmup=0, clock=self.clock, metrics=self.metrics)
        self.rollout = Rollout(self.ledger, self.issuer, self.registry)
        source = RepoSource(str(self.repo), "main", tmp / "state")
        self.reconciler = Reconciler(
            source, self.ledger, self.issuer, self.rollout, registry=self.registry, metrics=self.metrics
        )

    def deps(self) -> ApiDeps:
        return ApiDeps(
            ledger=self.ledger,
            registry=self.registry,
            rollout=self.rollout,
            last_compile=self.ledger.last_compile,
            ready=lambda: None,
            metrics=self.metrics,
        )


@pytest.fixture
def plane(tmp_path: Path, h: Any) -> Iterator[Plane]:
    made = Plane(tmp_path, h)
    yield made
    made.metrics.close()


Check = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


def serve(deps: ApiDeps, check: Check) -> None:
    async def main() -> None:
        runner = web.AppRunner(make_app(deps), access_log=None, handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
                await check(session, f"http://{host}:{port}")
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def post(session: aiohttp.ClientSession, url: str, body: object) -> tuple[int, Any]:
    async with session.post(url, data=json.dumps(body), headers={"content-type": "application/json"}) as response:
        return response.status, await response.json()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def metrics_of(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return scrape(await response.text())


def beat(service: str = "api", version: str = "v1", *, requests_total: int | None = None, **claims: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"service": service, "version": version, "address": "127.0.0.1:9081", **claims}
    if requests_total is not None:
        body["requests_total"] = requests_total
    return body


# -- the counters and gauges, after known events -------------------------------------------


def test_metrics_count_compiles_releases_nacks_and_follow_the_rollout(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        # Before anything: every series is there, at 0.
        m = await metrics_of(session, url)
        for result in ("ok", "rejected", "source-unavailable"):
            assert value(m, "starmesh_compile_total", result=result) == 0
        for reason in ("commit", "reissue", "rollback", "halt"):
            assert value(m, "starmesh_releases_issued_total", reason=reason) == 0
        assert value(m, "starmesh_nacks_total") == 0
        assert value(m, "starmesh_release_version") == 0
        assert all(value(m, "starmesh_rollout_phase", phase=p) == 0 for p in ("canary", "baking", "promoted", "complete", "halted"))
        assert not [k for k in m if k[0] == "target_info" or any(n.startswith("otel_") for n, _ in k[1])]

        # A good commit: compiled ok, released, the rollout complete (no proxies yet).
        assert (await plane.reconciler.reconcile()).outcome == "released"
        m = await metrics_of(session, url)
        assert value(m, "starmesh_compile_total", result="ok") == 1
        assert value(m, "starmesh_compile_duration_seconds_count", result="ok") == 1
        assert value(m, "starmesh_compile_duration_seconds_sum", result="ok") > 0
        assert value(m, "starmesh_compile_duration_seconds_bucket", result="ok", le="+Inf") == 1
        assert value(m, "starmesh_releases_issued_total", reason="commit") == 1
        assert value(m, "starmesh_release_version") == 1
        assert value(m, "starmesh_rollout_phase", phase="complete") == 1
        assert value(m, "starmesh_rollout_phase", phase="promoted") == 0
        release = plane.ledger.current()
        assert release is not None

        # Two proxies: one ACKs, one NACKs.
        for proxy in ("p1", "p2"):
            assert (await post(session, f"{url}/v1/proxies/{proxy}", beat()))[0] == 200
        ack = {"version": release.version, "bundle": release.bundle, "error": None}
        assert await post(session, url + "/v1/proxies/p1/status", ack) == (200, {"state": "synced"})
        nack = {**ack, "error": "release 1: golden request 'default route' failed"}
        assert await post(session, url + "/v1/proxies/p2/status", nack) == (200, {"state": "failed"})
        m = await metrics_of(session, url)
        assert value(m, "starmesh_nacks_total") == 1
        assert [value(m, "starmesh_proxies", state=s) for s in ("synced", "pending", "failed", "stale")] == [1, 0, 1, 0]
        assert value(m, "starmesh_rollout_targeted_proxies") == 2
        assert value(m, "starmesh_rollout_acked_proxies") == 1

        # A refused commit: counted and timed as rejected; nothing released.
        h.commit(plane.repo, {"mesh.star": BROKEN})
        assert (await plane.reconciler.reconcile()).outcome == "rejected"
        m = await metrics_of(session, url)
        assert value(m, "starmesh_compile_total", result="rejected") == 1
        assert value(m, "starmesh_compile_duration_seconds_count", result="rejected") == 1
        assert value(m, "starmesh_compile_total", result="ok") == 1
        assert value(m, "starmesh_releases_issued_total", reason="commit") == 1
        assert value(m, "starmesh_release_version") == 1

        # A staged commit: half the live proxies are canaries, none has it yet.
        h.commit(plane.repo, {"mesh.star": STAGED})
        assert (await plane.reconciler.reconcile()).outcome == "released"
        m = await metrics_of(session, url)
        assert value(m, "starmesh_rollout_phase", phase="canary") == 1
        assert value(m, "starmesh_rollout_phase", phase="complete") == 0
        assert (value(m, "starmesh_rollout_targeted_proxies"), value(m, "starmesh_rollout_acked_proxies")) == (1, 0)
        canary = plane.rollout.to_json()["canary"]
        assert isinstance(canary, list) and len(canary) == 1
        # The canary waits for release 2; the other keeps release 1 (p1 ran it, p2 refused it).
        expected = {"synced": 0, "pending": 1, "failed": 0, "stale": 0}
        expected["failed" if canary[0] == "p1" else "synced"] += 1
        assert {s: value(m, "starmesh_proxies", state=s) for s in expected} == expected
        staged = plane.ledger.current()
        assert staged is not None and staged.version == 2
        acked = {"version": 2, "bundle": staged.bundle, "error": None}
        assert await post(session, f"{url}/v1/proxies/{canary[0]}/status", acked) == (200, {"state": "synced"})
        m = await metrics_of(session, url)  # no bake time: promoted at once, to both
        assert value(m, "starmesh_rollout_phase", phase="promoted") == 1
        assert (value(m, "starmesh_rollout_targeted_proxies"), value(m, "starmesh_rollout_acked_proxies")) == (2, 1)

        # A rollback: issued, the newest version.
        status, answer = await post(session, url + "/v1/rollback", {"to": release.bundle})
        assert status == 200 and answer["release"]["version"] == 3
        m = await metrics_of(session, url)
        assert value(m, "starmesh_releases_issued_total", reason="rollback") == 1
        assert value(m, "starmesh_release_version") == 3
        assert value(m, "starmesh_rollout_phase", phase="promoted") == 1
        assert (value(m, "starmesh_rollout_targeted_proxies"), value(m, "starmesh_rollout_acked_proxies")) == (2, 0)

        # The repository gone: source-unavailable, counted without a duration.
        plane.repo.rename(plane.repo.with_name("moved"))
        assert (await plane.reconciler.reconcile()).outcome == "source-unavailable"
        m = await metrics_of(session, url)
        assert value(m, "starmesh_compile_total", result="source-unavailable") == 1
        assert ("starmesh_compile_duration_seconds_count", (("result", "source-unavailable"),)) not in m
        assert value(m, "starmesh_nacks_total") == 1

    serve(plane.deps(), check)


def test_two_control_planes_in_one_process_keep_their_own_series() -> None:
    first, second = ControlPlaneMetrics(), ControlPlaneMetrics()
    try:
        first.compiled("ok", 0.25)
        first.nacked()
        second.observe(proxies=lambda: {"stale": 3}, rollout=lambda: RolloutProgress("baking", 4, 2), release_version=lambda: 9)
        one, two = scrape(first.render().decode()), scrape(second.render().decode())
        assert value(one, "starmesh_compile_total", result="ok") == 1 and value(two, "starmesh_compile_total", result="ok") == 0
        assert value(one, "starmesh_nacks_total") == 1 and value(two, "starmesh_nacks_total") == 0
        assert value(one, "starmesh_proxies", state="stale") == 0 and value(two, "starmesh_proxies", state="stale") == 3
        assert value(two, "starmesh_rollout_phase", phase="baking") == 1
        assert (value(two, "starmesh_rollout_targeted_proxies"), value(two, "starmesh_rollout_acked_proxies")) == (4, 2)
        assert value(one, "starmesh_release_version") == 0 and value(two, "starmesh_release_version") == 9
        assert value(one, "starmesh_compile_duration_seconds_bucket", result="ok", le="0.25") == 1
        assert value(one, "starmesh_compile_duration_seconds_bucket", result="ok", le="0.1") == 0
    finally:
        first.close()
        second.close()
    first.close()  # idempotent


def test_an_app_without_metrics_serves_its_own_gauges(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    asyncio.run(plane.reconciler.reconcile())
    deps = ApiDeps(plane.ledger, plane.registry, plane.rollout, plane.ledger.last_compile, lambda: None)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        assert (await post(session, url + "/v1/proxies/p1", beat()))[0] == 200
        m = await metrics_of(session, url)
        assert value(m, "starmesh_release_version") == 1
        assert value(m, "starmesh_proxies", state="pending") == 1
        assert value(m, "starmesh_compile_total", result="ok") == 0  # the events went to plane.metrics

    serve(deps, check)


# -- /v1/status: request rate, age, releases behind ----------------------------------------


def test_status_shows_each_proxys_rate_age_and_how_far_behind_it_is(plane: Plane, h: Any) -> None:
    h.commit(plane.repo, {"mesh.star": h.policy("v1")})
    asyncio.run(plane.reconciler.reconcile())
    first = plane.ledger.current()
    assert first is not None

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        runs_first = {"release_version": first.version, "bundle": first.bundle}
        assert (await post(session, url + "/v1/proxies/old", beat(**runs_first)))[0] == 200  # an older proxy: no count
        assert (await post(session, url + "/v1/proxies/busy", beat(requests_total=100, **runs_first)))[0] == 200
        plane.clock.now += 10
        assert (await post(session, url + "/v1/proxies/busy", beat(requests_total=160, **runs_first)))[0] == 200
        plane.clock.now += 2.5

        proxies = {p["id"]: p for p in (await get_json(session, url + "/v1/status"))["proxies"]}
        assert proxies["busy"]["request_rate"] == 6.0  # 60 requests over the 10 s between its heartbeats
        assert proxies["busy"]["last_seen_seconds_ago"] == 2.5
        assert proxies["old"]["request_rate"] is None and proxies["old"]["last_seen_seconds_ago"] == 12.5
        for proxy in proxies.values():
            assert (proxy["desired_release_version"], proxy["releases_behind"], proxy["state"]) == (1, 0, "synced")

        # Two more releases: both proxies are two behind; one NACKs the newest and says why.
        h.commit(plane.repo, {"mesh.star": h.policy("v2")})
        assert (await plane.reconciler.reconcile()).outcome == "released"
        status, answer = await post(session, url + "/v1/rollback", {"to": first.bundle})
        assert status == 200 and answer["release"]["version"] == 3
        nack = {"version": 3, "bundle": first.bundle, "error": "release 3: signed by an untrusted key"}
        assert (await post(session, url + "/v1/proxies/busy/status", nack))[0] == 200
        proxies = {p["id"]: p for p in (await get_json(session, url + "/v1/status"))["proxies"]}
        assert (proxies["busy"]["desired_release_version"], proxies["busy"]["releases_behind"]) == (3, 2)
        assert proxies["busy"]["state"] == "failed" and proxies["busy"]["error"] == nack["error"]
        assert proxies["busy"]["release_version"] == 1
        assert (proxies["old"]["releases_behind"], proxies["old"]["state"]) == (2, "pending")

        # A restarted proxy counts from 0 again: its rate is what it counted since.
        plane.clock.now += 10
        restarted = beat(requests_total=30, release_version=3, bundle=first.bundle)
        assert (await post(session, url + "/v1/proxies/busy", restarted))[0] == 200
        proxies = {p["id"]: p for p in (await get_json(session, url + "/v1/status"))["proxies"]}
        assert proxies["busy"]["request_rate"] == pytest.approx(30 / 12.5)
        assert proxies["busy"]["releases_behind"] == 0

        # A bad count is refused, and changes nothing.
        for bad, message in ((-1, "requests_total -1 is negative"), ("7", "Expected `int | null`, got `str`")):
            status, answer = await post(session, url + "/v1/proxies/busy", {**restarted, "requests_total": bad})
            assert status == 400 and message in answer["error"], answer
        entry = plane.registry.get("busy")
        assert entry is not None and entry.requests[-1][0] == 30

    serve(plane.deps(), check)
