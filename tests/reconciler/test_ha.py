"""ha.Replication, two replicas on a real etcd: their metrics and what they say of each other.

    replica r1 ─┐                    ┌─ ControlPlaneMetrics r1 ─► Prometheus text ─► exact values
                ├── etcd (fixture) ──┤
    replica r2 ─┘                    └─ ControlPlaneMetrics r2 ─► ...
                                        to_json() ─► /v1/status "control_plane" (problems, ages)

Each replica is what service.py builds for `--store`: a Replication on its own EtcdStore,
a Ledger over the fenced store, a Registry and a follower Rollout. A proxy "talks to" a
replica by the test calling that replica's registry and `published`, as the API does.
A test's body gets `start` from the `with_replicas` fixture, which stops every replica
started. Waits poll with a deadline; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from starmesh.reconciler.ha import ReplicaSettings, Replication
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import ControlPlaneMetrics
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout

REPO = "https://git.test/acme/mesh-policy.git"
KEY_A, KEY_B = "a" * 64, "b" * 64


@dataclass
class Replica:
    """One replica's HA parts and its metrics."""

    name: str
    replication: Replication
    registry: Registry
    metrics: ControlPlaneMetrics
    roles: list[bool]

    def metric(self, name: str, **labels: str) -> float | None:
        """The sample's value now, None when the series does not exist."""
        for family in text_string_to_metric_families(self.metrics.render().decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def heartbeat(self, proxy_id: str, address: str) -> None:
        self.registry.heartbeat(proxy_id, "reviews", "v1", address, release_version=None, bundle=None)
        self.replication.published(proxy_id)


Start = Callable[..., Awaitable[Replica]]
Body = Callable[[Start], Awaitable[None]]


@pytest.fixture
def with_replicas(etcd_server: Any, tmp_path: Path, h: Any) -> Callable[[Body], None]:
    """with_replicas(body): `await body(start)` in a new event loop, where `await start(name,
    key=, branch="main")` starts replica `name` on the test's etcd, announcing signing key `key`
    and that branch (releases are signed with one key pair made for the test); every replica
    started is stopped, and its metrics closed, when `body` ends or fails."""
    signer = h.keys(tmp_path / "keys").signer()

    def run(body: Body) -> None:
        h.run(lambda: started_in(body))

    async def started_in(body: Body) -> None:
        started: list[Replica] = []

        async def start(name: str, *, key: str, branch: str = "main") -> Replica:
            replication = Replication(ReplicaSettings(etcd_server.url, name, leader_ttl=2.0))
            await asyncio.to_thread(replication.open)
            ledger = Ledger(replication.store.fenced(replication.fence))
            registry = Registry(ttl=30, warmup=0)
            rollout = Rollout(ledger, Issuer(ledger, signer), registry, writable=False)
            metrics = ControlPlaneMetrics()
            replica = Replica(name, replication, registry, metrics, [])
            started.append(replica)
            replication.start(
                f"http://{name}.test", registry, rollout, on_change=replica.roles.append, on_release=lambda: None,
                client_ssl=None, signing_key=key, repo=REPO, branch=branch, metrics=metrics,
            )  # fmt: skip
            return replica

        try:
            await body(start)
        finally:
            for replica in started:
                await replica.replication.stop()
                replica.metrics.close()

    return run


def test_replica_metrics_follow_the_role_the_replicas_the_store_and_the_writes(
    with_replicas: Callable[[Body], None], etcd_server: Any, h: Any
) -> None:
    async def main(start: Start) -> None:
        r1 = await start("r1", key=KEY_A)
        await h.until(lambda: r1.replication.leading, "r1 leads")
        r2 = await start("r2", key=KEY_A)
        await h.until(lambda: r1.metric("starmesh_control_plane_replicas") == 2, "r1 sees both")
        await h.until(lambda: r2.metric("starmesh_control_plane_replicas") == 2, "r2 sees both")
        for replica, leading, changes in ((r1, 1, 1), (r2, 0, 0)):
            assert replica.metric("starmesh_control_plane_leader") == leading
            assert replica.metric("starmesh_control_plane_leader_changes_total") == changes
            assert replica.metric("starmesh_control_plane_store_available", kind="etcd") == 1
            assert replica.metric("starmesh_control_plane_store_available", kind="file") is None
            assert replica.metric("starmesh_control_plane_registration_writes_total") == 0

        # a proxy on r2: r2 writes its record, r1 only reads it
        r2.heartbeat("p1", "127.0.0.1:9001")
        await h.until(lambda: r2.metric("starmesh_control_plane_registration_writes_total") == 1, "r2's write")
        await h.until(lambda: r1.registry.get("p1") is not None, "p1 on r1")
        r2.heartbeat("p1", "127.0.0.1:9001")  # unchanged, within the refresh window: not written
        r2.heartbeat("p2", "127.0.0.1:9002")  # queued after it: once p2 is on r1, p1 went too (or not at all)
        await h.until(lambda: r1.registry.get("p2") is not None, "p2 on r1")
        await h.until(lambda: r2.metric("starmesh_control_plane_registration_writes_total") == 2, "p2's write")
        assert r2.replication.sync is not None and r2.replication.sync.written == 2
        assert r1.metric("starmesh_control_plane_registration_writes_total") == 0

        # r1 stops cleanly: r2 leads at once
        await r1.replication.stop()
        await h.until(lambda: r2.metric("starmesh_control_plane_leader") == 1, "r2 leads")
        await h.until(lambda: r2.metric("starmesh_control_plane_replicas") == 1, "r1 gone from r2's list")
        assert r2.metric("starmesh_control_plane_leader_changes_total") == 1 and r2.roles == [True]

        # etcd gone: read-only, and the leader steps down; back: it leads again
        etcd_server.kill()
        await h.until(lambda: r2.metric("starmesh_control_plane_store_available", kind="etcd") == 0, "read-only")
        await h.until(lambda: r2.metric("starmesh_control_plane_leader") == 0, "r2 stepped down")
        await asyncio.to_thread(etcd_server.start)
        await h.until(lambda: r2.metric("starmesh_control_plane_store_available", kind="etcd") == 1, "writable")
        await h.until(lambda: r2.metric("starmesh_control_plane_leader") == 1, "r2 leads again")
        assert r2.metric("starmesh_control_plane_leader_changes_total") == 3 and r2.roles == [True, False, True]

    with_replicas(main)


def test_replicas_with_different_keys_or_branches_list_the_problem_on_both(
    with_replicas: Callable[[Body], None], h: Any
) -> None:
    async def main(start: Start) -> None:
        r1 = await start("r1", key=KEY_A)
        r2 = await start("r2", key=KEY_B, branch="release")
        await h.until(lambda: all(len(r.replication.to_json()["replicas"]) == 2 for r in (r1, r2)), "both listed")
        one, two = r1.replication.to_json(), r2.replication.to_json()
        assert one["problems"] == [
            f"replica r2 signs with key {KEY_B}, this one (r1) with {KEY_A}: proxies trusting only one key "
            "will NACK releases after a failover",
            f"replica r2 follows {REPO} branch release, this one (r1) {REPO} branch main: a failover would "
            "release another policy",
        ]
        assert two["problems"] == [
            f"replica r1 signs with key {KEY_A}, this one (r2) with {KEY_B}: proxies trusting only one key "
            "will NACK releases after a failover",
            f"replica r1 follows {REPO} branch main, this one (r2) {REPO} branch release: a failover would "
            "release another policy",
        ]
        listed = one["replicas"]
        assert isinstance(listed, list)
        assert [(r["id"], r["key"], r["branch"]) for r in listed] == [("r1", KEY_A, "main"), ("r2", KEY_B, "release")]
        assert all(isinstance(r["seen_seconds_ago"], float) and r["seen_seconds_ago"] >= 0 for r in listed)

        await r2.replication.stop()  # the odd one leaves: nothing left to say
        await h.until(lambda: r1.replication.to_json()["problems"] == [], "no problems once r2 left")

    with_replicas(main)
