"""The proxy's control-plane client against a control-plane double that also answers badly on purpose.

An in-process `Proxy` in the control-plane form (real listeners, real RouteTables, a real
state dir) talks to `ControlPlaneDouble` (tests/runtime/control_plane_double.py: aiohttp on
127.0.0.1:0 in its own thread; the `cp` and `planes` fixtures of tests/runtime/conftest.py),
which signs real releases with a real Ed25519 key. Each bad input must come back as a
NACK whose reason says what was wrong, show up in `/config`'s `last_error`, and change
nothing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.keys import PrivateKey
from starmesh.runtime.control_http import Backoff, Channel, ControlLimits, ControlPlaneSettings, Targets, new_session
from starmesh.runtime.control_report import Reporter
from starmesh.runtime.lkg import load_state
from starmesh.runtime.proxy import CONTROL_PLANE_PLAINTEXT_NOTICE, Proxy, ProxyConfig

DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""


@asynccontextmanager
async def running_proxy(
    state_dir: Path, urls: list[str], trusted: list[Any], limits: ControlLimits = ControlLimits()
) -> AsyncIterator[Proxy]:
    config = ProxyConfig(
        service="web", version="v1", app="127.0.0.1:1", inbound="127.0.0.1:0", outbound="127.0.0.1:0",
        admin="127.0.0.1:0", state_dir=state_dir, control_plane=tuple(urls), trusted=tuple(trusted),
        control_limits=limits, grace_seconds=0.5,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(config, out=io.StringIO())
    try:
        await proxy.start()
        yield proxy
    finally:
        await proxy.stop()


async def until(test: Callable[[], Any], what: str) -> Any:
    end = asyncio.get_running_loop().time() + DEADLINE
    while True:
        result = test()
        if result:
            return result
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def admin(proxy: Proxy, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{proxy.listeners['admin']}{path}") as response:
            return response.status, await response.text()


async def config(proxy: Proxy) -> dict[str, Any]:
    status, text = await admin(proxy, "/config")
    assert status == 200, text
    result: dict[str, Any] = json.loads(text)
    return result


def printed(proxy: Proxy) -> list[str]:
    out = proxy.out
    assert isinstance(out, io.StringIO)
    return out.getvalue().splitlines()


def reports_with(cp: Any, version: int | None, *, error: bool) -> list[dict[str, Any]]:
    return [r for r in cp.reports_of() if r["version"] == version and (r["error"] is not None) == error]


# -- the happy path -------------------------------------------------------------------


def test_apply_ack_endpoints_and_heartbeats(tmp_path: Path, cp: Any, bundles: Any) -> None:
    state = tmp_path / "state"

    async def go() -> None:
        async with running_proxy(state, [cp.url], [cp.public_key]) as proxy:
            assert printed(proxy)[0] == CONTROL_PLANE_PLAINTEXT_NOTICE
            assert printed(proxy)[-1].startswith("not ready: no config yet: no last-known-good in ")
            first = cp.publish(bundles.v1)
            await until(lambda: reports_with(cp, 1, error=False), "the ACK of release 1")
            assert cp.reports_of() == [{"version": 1, "bundle": first.digest, "error": None}]
            assert f"applied release 1 {first.digest}" in printed(proxy)
            shown = await config(proxy)
            assert (shown["release_version"], shown["bundle"], shown["origin"]) == (1, first.digest, "control-plane")
            assert shown["last_error"] is None
            block = shown["control_plane"]
            assert (block["url"], block["connected"]) == (cp.url, True)
            assert block["last_contact"].endswith("Z") and block["proxy_id"].startswith("web-v1-")
            assert (await admin(proxy, "/readyz"))[0] == 200

            # Heartbeats carry what the proxy runs, at the interval the control plane asked for.
            beat = await until(
                lambda: [b for who, b in cp.heartbeats if b["release_version"] == 1 and len(cp.heartbeats) >= 3],
                "heartbeats after the apply",
            )
            assert beat[-1] == {"service": "web", "version": "v1", "address": proxy.listeners["inbound"],
                                "release_version": 1, "bundle": first.digest, "requests_total": 0}
            assert {who for who, _ in cp.heartbeats} == {block["proxy_id"]}
            assert (state / "proxy-id").read_text().strip() == block["proxy_id"]

            cp.set_endpoints({"api": {"v2": ["127.0.0.1:7002"]}})
            await until(lambda: proxy.endpoints.get("api", "v2") == ("127.0.0.1:7002",), "the endpoint table")
            cp.set_endpoints({"api": {"v2": ["not an address"]}})  # refused: the table stays

            def asked_again_after_the_bad_table() -> bool:
                events = list(cp.events)
                return "endpoints 2 answered" in events and "endpoints after 1" in events[
                    events.index("endpoints 2 answered"):
                ]

            await until(asked_again_after_the_bad_table, "a poll after the refused table")
            assert proxy.endpoints.get("api", "v2") == ("127.0.0.1:7002",)
            assert proxy.endpoints.version == 1

            second = cp.publish(bundles.v2)
            await until(lambda: reports_with(cp, 2, error=False), "the ACK of release 2")
            assert f"applied release 2 {second.digest}" in printed(proxy)
            assert proxy.applier.applied is not None and proxy.applier.applied.digest == second.digest
            status, metrics = await admin(proxy, "/metrics")
            assert "starmesh_config_release_version 2" in metrics
            assert "starmesh_control_plane_last_contact_seconds " in metrics
            assert "starmesh_control_plane_last_contact_seconds +Inf" not in metrics

        stored = load_state(state)
        assert [(g.release_version, g.digest) for g in stored.generations] == [(2, second.digest), (1, first.digest)]
        assert stored.generations[0].envelope == second.envelope
        assert dict(stored.generations[0].endpoints) == {"api": {"v2": ("127.0.0.1:7002",)}}
        assert stored.high_water is not None and stored.high_water.version == 2

    asyncio.run(go())


def test_a_reissue_of_the_live_bundle_applies_without_a_fetch(tmp_path: Path, cp: Any, bundles: Any) -> None:
    async def go() -> None:
        async with running_proxy(tmp_path / "state", [cp.url], [cp.public_key]) as proxy:
            first = cp.publish(bundles.v1)
            await until(lambda: reports_with(cp, 1, error=False), "the ACK of release 1")
            table = proxy.applier.current
            cp.bundle_answers[first.digest] = 500  # a fetch would fail now
            cp.publish(bundles.v1)
            await until(lambda: reports_with(cp, 2, error=False), "the ACK of the re-issue")
            assert proxy.applier.current is table
            assert (await config(proxy))["release_version"] == 2

    asyncio.run(go())


# -- bad input: NACK with the reason, nothing changes -------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad input: `serve` makes the double answer it (as release 2); `reason` is in the NACK."""

    serve: Callable[[Any, Any], None]
    reason: str
    limits: ControlLimits = ControlLimits()
    nack_bundle: bool = True  # the NACK names the bundle (False: the release could not be read)
    nack_version: int | None = 2  # the version the NACK names (None: no release was read)
    replay: bool = False  # release 2 is applied first
    cut_before: int | None = None  # an endless answer: the double wrote less than this before the hang-up


def _tampered_bundle(cp: Any, b: Any) -> None:
    cp.bundle_answers[digest_of(b.v2)] = b.v2.replace(b'"v2":100', b'"v1":100')
    cp.publish(b.v2)


def flip_payload_byte(envelope: bytes) -> bytes:
    """The envelope with one byte of its payload changed (the signature no longer covers it)."""
    doc = json.loads(envelope)
    payload = bytearray(base64.b64decode(doc["payload"]))
    index = payload.index(b'"mesh":"t"') + len('"mesh":"')
    payload[index] = ord("u")
    doc["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(doc).encode()


def with_payload_type(envelope: bytes, payload_type: str) -> bytes:
    doc = json.loads(envelope)
    doc["payloadType"] = payload_type
    return json.dumps(doc).encode()


def _flipped_payload_byte(cp: Any, b: Any) -> None:
    published = cp.publish(b.v2, serve=False)
    cp.offer(2, flip_payload_byte(published.envelope))


def _changed_payload_type(cp: Any, b: Any) -> None:
    published = cp.publish(b.v2, serve=False)
    cp.offer(2, with_payload_type(published.envelope, "application/vnd.in-toto+json"))


def _replayed_older_release(cp: Any, b: Any) -> None:
    cp.offer(1, cp.published[0].envelope, always=True)


BAD = {
    "tampered-bundle": Bad(_tampered_bundle, "bundle rejected: bundle digest mismatch: expected sha256:"),
    "flipped-payload-byte": Bad(_flipped_payload_byte, "no valid signature by a trusted key", nack_bundle=False),
    "changed-payload-type": Bad(
        _changed_payload_type, "envelope payloadType is 'application/vnd.in-toto+json'", nack_bundle=False
    ),
    "unknown-signing-key": Bad(
        lambda cp, b: cp.publish(b.v2, key=PrivateKey.generate()), "no valid signature by a trusted key",
        nack_bundle=False,
    ),
    "replayed-older-release": Bad(
        _replayed_older_release, "release version 1 is older than the applied version 2", nack_version=1,
        nack_bundle=False, replay=True,
    ),
    "expired-release": Bad(
        lambda cp, b: cp.publish(b.v2, now=datetime.now(UTC) - timedelta(days=8)), "release version 2 expired at",
        nack_bundle=False,
    ),
    "same-version-other-bundle": Bad(
        lambda cp, b: cp.offer(1, cp.publish(b.v2, version=1, serve=False).envelope, always=True),
        "a new bundle needs a new, higher version", nack_version=1,
        nack_bundle=False,
    ),
    "oversized-envelope": Bad(
        lambda cp, b: cp.offer(2, b"{" + b" " * 70_000 + b"}"),
        "the answer declares 70002 bytes, over the 65536-byte cap for a release", nack_bundle=False,
        nack_version=None,
    ),
    "endless-envelope": Bad(
        lambda cp, b: cp.offer(2, mode="endless"), "the answer went past the 65536-byte cap for a release",
        nack_bundle=False, nack_version=None, cut_before=32 * 1024 * 1024,  # socket buffers, not 64 MiB
    ),
    "oversized-bundle": Bad(
        lambda cp, b: (cp.bundle_answers.__setitem__(digest_of(b.v2), "huge-length"), cp.publish(b.v2)),
        "the answer declares 104857600 bytes, over the 67108864-byte cap",
    ),
    "endless-bundle": Bad(
        lambda cp, b: (cp.bundle_answers.__setitem__(digest_of(b.v2), "endless"), cp.publish(b.v2)),
        "the answer went past the 1048576-byte cap for a bundle",
        limits=ControlLimits(bundle_bytes=1024 * 1024), cut_before=32 * 1024 * 1024,
    ),
    "bundle-dripping-forever": Bad(
        lambda cp, b: (cp.bundle_answers.__setitem__(digest_of(b.v2), "drip"), cp.publish(b.v2)),
        "no complete answer within 1 s", limits=ControlLimits(bundle_seconds=1.0),
    ),
    "bundle-missing": Bad(lambda cp, b: cp.publish(b.v2, store=False), "HTTP 404: {\"error\": \"no bundle sha256:"),
    "golden-requests-fail": Bad(
        lambda cp, b: cp.publish(b.golden_failing), "golden requests failed against the new route table"
    ),
    "not-a-bundle": Bad(lambda cp, b: cp.publish(b'{"apiVersion": "starmesh/v1"}'), "bundle rejected: "),
}


@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_nacked_with_the_reason_and_changes_nothing(
    tmp_path: Path, cp: Any, bundles: Any, case: Bad
) -> None:
    state = tmp_path / "state"

    async def go() -> None:
        async with running_proxy(state, [cp.url], [cp.public_key], case.limits) as proxy:
            first = cp.publish(bundles.v1)
            await until(lambda: reports_with(cp, 1, error=False), "the ACK of release 1")
            if case.replay:  # the replay needs a newer release applied first
                cp.publish(bundles.v2)
                await until(lambda: reports_with(cp, 2, error=False), "the ACK of release 2")
            live = proxy.applier.applied
            assert live is not None
            before = (await config(proxy))
            generations = [(g.generation, g.digest) for g in load_state(state).generations]

            case.serve(cp, bundles)
            nacks = await until(lambda: [r for r in cp.reports_of() if r["error"] is not None], "a NACK")
            nack = nacks[0]
            assert case.reason in nack["error"], nack
            assert nack["version"] == case.nack_version
            assert (nack["bundle"] is not None) == case.nack_bundle

            shown = await config(proxy)
            assert case.reason in shown["last_error"]["error"]
            assert shown["last_error"]["origin"] == "control-plane"
            for field in ("release_version", "bundle", "applied_at", "origin"):
                assert shown[field] == before[field], field
            assert proxy.applier.applied is live
            assert (await admin(proxy, "/readyz"))[0] == 200
            assert sum(line.startswith("applied release ") for line in printed(proxy)) == (2 if case.replay else 1)
            if case.cut_before is not None:
                written = await until(lambda: cp.streamed, "the endless answer to end")
                assert written[0] < case.cut_before, written
        assert [(g.generation, g.digest) for g in load_state(state).generations] == generations
        assert first.digest in {d for _, d in generations}

    asyncio.run(go())


def test_a_nack_is_not_retried_in_a_hot_loop(tmp_path: Path, cp: Any, bundles: Any) -> None:
    async def go() -> None:
        async with running_proxy(tmp_path / "state", [cp.url], [cp.public_key]) as proxy:
            cp.publish(bundles.v1)
            await until(lambda: reports_with(cp, 1, error=False), "the ACK of release 1")
            cp.publish(bundles.v2, key=PrivateKey.generate())
            await until(lambda: len(reports_with(cp, 2, error=True)) >= 3, "three NACKs of release 2")
        # Between two NACKs the client waited, then asked once: one answered poll per NACK.
        events = [e for e in cp.events if e in ("release", "report")]
        after_ack = events[events.index("report") + 1:]
        nack_runs = "".join("r" if e == "release" else "N" for e in after_ack)
        assert nack_runs.startswith("rNrNrN"), nack_runs

    asyncio.run(go())


def test_backoff_is_jittered_exponential_and_capped() -> None:
    backoff = Backoff(0.2, 10.0, random.Random(7))
    delays = [backoff.next() for _ in range(10)]
    for n, delay in enumerate(delays):
        full = min(10.0, 0.2 * 2**n)
        assert full / 2 <= delay <= full
    backoff.reset()
    assert backoff.next() <= 0.2
    assert ControlLimits() == replace(
        ControlLimits(), envelope_bytes=64 * 1024, bundle_bytes=64 * 1024 * 1024, endpoints_bytes=8 * 1024 * 1024,
        wait_seconds=30.0, poll_slack_seconds=15.0, backoff_base=0.2, backoff_cap=10.0, nack_backoff_base=1.0,
        nack_backoff_cap=60.0, heartbeat_seconds=5.0,
    )


# -- failover ---------------------------------------------------------------------------


def test_failover_across_control_plane_urls(
    tmp_path: Path, planes: Callable[..., Any], bundles: Any, rt: Any
) -> None:
    first = planes()
    second = planes(key=first.key)
    for plane in (first, second):
        plane.publish(bundles.v1)

    async def go() -> None:
        async with running_proxy(tmp_path / "state", [rt.dead_url(), first.url, second.url], [first.public_key]) as proxy:
            await until(lambda: reports_with(first, 1, error=False), "release 1 from the first live URL")
            assert (await config(proxy))["control_plane"]["url"] == first.url
            await asyncio.to_thread(first.close)
            await until(lambda: second.heartbeats, "heartbeats at the second URL")
            await until(
                lambda: proxy.client is not None and proxy.client.targets.connected
                and proxy.client.targets.current == second.url, "connected to the second URL"
            )
            block = (await config(proxy))["control_plane"]
            assert (block["url"], block["connected"]) == (second.url, True)
            published = second.publish(bundles.v2)
            await until(lambda: reports_with(second, 2, error=False), "release 2 from the second URL")
            assert proxy.applier.applied is not None and proxy.applier.applied.digest == published.digest

    asyncio.run(go())


# -- the channel and the reporter on a session they do not own (fleet_proxy.py's way) ----


@dataclass(frozen=True)
class Runs:
    """What a proxy without a route table runs (control_report.Running)."""

    release_version: int | None
    digest: str


def test_a_reporter_on_a_shared_session(cp: Any) -> None:
    digest = "sha256:" + "ab" * 32
    settings = ControlPlaneSettings(urls=(cp.url,), trusted=(), proxy_id="sim-1", service="fleet", version="v1")

    async def go() -> None:
        session = new_session(user_agent="starmesh-test")
        heard: list[str] = []
        accepted: list[tuple[int | None, str | None, str | None]] = []
        try:
            channel = Channel(settings, session=session)
            channel.open()
            reporter = Reporter(
                channel, applied=lambda: Runs(4, digest), address=lambda: "127.0.0.1:9", rng=random.Random(1),
                requests_total=lambda: 0, on_heartbeat=lambda: heard.append("heartbeat"),
                on_accepted=lambda *report: accepted.append(report),
            )  # fmt: skip
            await reporter.heartbeat(cp.url)
            await reporter.report(4, digest, None)
            await channel.close()
            assert not session.closed  # the channel did not own it
            await reporter.report(5, None, "release 5 refused: expired")  # and it still works
        finally:
            await session.close()
        assert heard == ["heartbeat"]
        assert accepted == [(4, digest, None), (5, None, "release 5 refused: expired")]
        assert reporter.heartbeat_seconds == cp.heartbeat_seconds  # taken from the answer
        assert channel.targets.connected and channel.targets.failovers == 0

    asyncio.run(go())
    assert cp.heartbeats == [("sim-1", {"service": "fleet", "version": "v1", "address": "127.0.0.1:9",
                                        "release_version": 4, "bundle": digest, "requests_total": 0})]  # fmt: skip
    assert cp.reports_of("sim-1") == [{"version": 4, "bundle": digest, "error": None},
                                      {"version": 5, "bundle": None, "error": "release 5 refused: expired"}]  # fmt: skip


def test_targets_count_the_moves_to_the_next_url() -> None:
    targets = Targets(("http://a", "http://b"))
    targets.failed("http://a", "refused")
    targets.failed("http://a", "refused")  # a URL already left behind: old news, no move
    targets.failed("http://b", "refused")
    assert (targets.current, targets.failovers) == ("http://a", 2)
