"""End to end: applying bundle files (SIGHUP) while traffic flows, and refusing bad ones."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
import pytest

from starmesh.bundle.canonical import decode_bundle, digest_of, encode_canonical

pytestmark = pytest.mark.slow

SWAPS = 100

TABLE = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {{"{version}": 100}}, set_request_headers = {{"x-table": "{table}"}})])
"""


def _install(live: Path, data: bytes) -> None:
    """Replace the bundle file atomically, so the proxy never reads half of it."""
    temp = live.with_suffix(".tmp")
    temp.write_bytes(data)
    os.replace(temp, live)


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (prometheus_client parses the text)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_swapping_bundles_under_load_fails_no_request(mesh: Any, h: Any, tmp_path: Path) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    table_a = mesh.bundle(TABLE.format(version="v1", table="A")).read_bytes()
    table_b = mesh.bundle(TABLE.format(version="v2", table="B")).read_bytes()
    digests = [digest_of(table_a), digest_of(table_b)]
    live = tmp_path / "live.json"
    _install(live, table_a)
    proxy = mesh.proxy("frontend", live, mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [v2.address]}}))
    assert proxy.config()["bundle"] == digests[0]

    async def run() -> tuple[list[Any], list[BaseException]]:
        stop = asyncio.Event()
        replies: list[Any] = []
        failures: list[BaseException] = []
        async with aiohttp.ClientSession() as session:

            async def client() -> None:
                while not stop.is_set():
                    try:
                        async with session.get(f"http://{proxy.outbound}/echo", headers={"Host": "reviews"}) as r:
                            body = await r.read()
                            replies.append((r.status, r.headers.get("x-app-name"), body))
                    except aiohttp.ClientError as exc:
                        failures.append(exc)

            async def applied(digest: str) -> bool:
                async with session.get(f"http://{proxy.admin}/config") as r:
                    return bool((await r.json())["bundle"] == digest)

            async def swapper() -> None:
                try:
                    for i in range(1, SWAPS + 1):
                        _install(live, (table_a, table_b)[i % 2])
                        os.kill(proxy.process.pid, signal.SIGHUP)
                        async with asyncio.timeout(10):
                            while not await applied(digests[i % 2]):
                                await asyncio.sleep(0.002)
                        # Let some requests run on this table before the next swap.
                        await asyncio.sleep(0.01)
                finally:
                    stop.set()

            await asyncio.gather(swapper(), *(client() for _ in range(8)))
        return replies, failures

    replies, failures = asyncio.run(run())

    assert failures == []
    tables: Counter[tuple[str | None, str | None]] = Counter()
    for status, app, body in replies:
        assert status == 200, body
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        # Routing and header mutation come from the same table: never v1 with B's header.
        tables[(app, seen.get("x-table"))] += 1
    assert set(tables) == {("v1", "A"), ("v2", "B")}, tables
    assert sum(tables.values()) == len(replies) >= SWAPS

    metrics = asyncio.run(_get_text(f"http://{proxy.admin}/metrics"))
    assert _metric(metrics, "starmesh_config_apply_total", result="ok") == SWAPS + 1
    assert _metric(metrics, "starmesh_config_apply_total", result="rejected") == 0


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.text()


GOLDEN = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {"v1": 100})])
request_test("reviews is answered by v1", service = "reviews", path = "/", backends = "v1")
"""


def _golden_failing(data: bytes) -> bytes:
    """The same bundle with its route edited behind the compiler's back: its golden request fails."""
    raw = json.loads(data)
    raw["spec"]["routes"]["reviews"][0]["backends"] = {"v2": 100}
    edited: bytes = encode_canonical(raw)
    decode_bundle(edited)  # still a well-formed bundle: only the golden request fails
    return edited


def test_invalid_and_golden_failing_bundles_keep_the_old_table(mesh: Any, h: Any, tmp_path: Path) -> None:
    v1, v2 = mesh.apps("v1", "v2")
    good = mesh.bundle(GOLDEN).read_bytes()
    live = tmp_path / "live.json"
    _install(live, good)
    proxy = mesh.proxy("frontend", live, mesh.endpoints({"reviews": {"v1": [v1.address], "v2": [v2.address]}}))
    assert proxy.config()["bundle"] == digest_of(good)

    def rejections(**reason: str) -> float:
        return _metric(asyncio.run(_get_text(f"http://{proxy.admin}/metrics")), "starmesh_config_apply_total",
                       result="rejected", **reason)

    assert rejections() == 0
    for count, (name, data, says) in enumerate(
        (
            ("not a bundle", b"{not json", "not valid JSON"),
            ("golden-failing", _golden_failing(good), "reviews is answered by v1"),
        ),
        start=1,
    ):
        _install(live, data)
        proxy.reload()
        h.poll_until(lambda: rejections() == count, f"the {name} file rejected")

        config = proxy.config()
        assert config["bundle"] == digest_of(good), name
        assert says in str(config["last_error"]), (name, config["last_error"])
        assert says in proxy.process.output(), f"{name}: the proxy's log does not say why"
        # The old table still routes every request to v1.
        replies = h.many(proxy.outbound, 10, "/still", host="reviews")
        assert [(r.status, r.app) for r in replies] == [(200, "v1")] * 10, name
    assert v1.count("GET /still") == 20
    assert v2.total() == 0
    assert (rejections(reason="invalid-bundle"), rejections(reason="golden-requests")) == (1, 1)
