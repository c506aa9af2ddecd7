"""State that survives applies, and a build that must not touch it until the swap."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from starmesh.bundle.spec import CircuitBreaker, RateLimit
from starmesh.compiler.compile import compile_tree
from starmesh.runtime.apply import Applier
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "api", endpoints = {{"v1": ["127.0.0.1:9"]}},
        circuit_breaker = circuit_breaker(max_connections = {limit}, max_requests = {limit}, max_pending_requests = 1))
request_test(name = "api goes to {expect}", service = "api", backends = "{expect}")
"""


def bundle(tmp_path: Path, limit: int, expect: str) -> bytes:
    root = tmp_path / f"p{limit}{expect}"
    root.mkdir()
    (root / "mesh.star").write_text(POLICY.format(limit=limit, expect=expect))
    result = compile_tree(root)
    assert result.data is not None, result.findings
    return result.data


def test_a_rejected_bundle_leaves_live_breaker_limits_untouched(tmp_path: Path) -> None:
    async def go() -> None:
        registry = StateRegistry()
        deps = ChainDeps(
            pool=UpstreamPool(), endpoints=Endpoints(), state=registry, recorder=MemoryRecorder(),
            local_service="web", rng=random.Random(1),
        )
        applier = Applier(deps, app="127.0.0.1:9", state_dir=None)
        good = bundle(tmp_path, 5, "v1")
        assert (await applier.apply(good, expected_digest=None, release_version=None, origin="file")).ok
        live = registry.breaker("api", CircuitBreaker(max_connections=5, max_requests=5, max_pending_requests=1))
        # Same service, limit 1, and a golden request that fails against the new table.
        bad = good.replace(b'"max_connections":5', b'"max_connections":1').replace(
            b'"max_requests":5', b'"max_requests":1').replace(b'"backends":{"v1":100}', b'"backends":{"v2":100}')
        result = await applier.apply(bad, expected_digest=None, release_version=None, origin="file")
        assert not result.ok
        assert live.limit == 5, "a rejected bundle changed the live breaker"
        await deps.pool.close()

    asyncio.run(go())


def test_a_transaction_defers_every_change_until_commit() -> None:
    registry = StateRegistry()
    live = registry.breaker("svc", CircuitBreaker(max_connections=5, max_pending_requests=1, max_requests=5))
    txn = registry.transaction()
    assert txn.breaker("svc", CircuitBreaker(max_connections=1, max_pending_requests=0, max_requests=1)) is live
    bucket = txn.bucket("svc", RateLimit(requests_per_second=1, burst=1), now=0.0)
    budget = txn.budget("svc")
    assert (live.limit, live.max_pending) == (5, 1)
    assert registry.transaction().bucket("svc", RateLimit(requests_per_second=1, burst=1), 0.0) is not bucket
    txn.commit()
    assert (live.limit, live.max_pending) == (1, 0)
    assert registry.bucket("svc", RateLimit(requests_per_second=1, burst=1), 0.0) is bucket
    assert registry.budget("svc") is budget
