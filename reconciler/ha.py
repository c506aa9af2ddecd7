"""One control-plane replica among several: the etcd store, the election, the replica set.

    --store etcd://...  ─► EtcdStore (a mirror of the prefix, kept by a watch)
                             ├── Ledger over store.fenced(election.fence): leader-only writes
                             ├── RegistrySync: proxies' records in and out (proxies/<id>)
                             └── changes under releases/ and rollout/ ─► Rollout.reload()
    LeaderElection (lease on `leader`) ─► on_change(leading) ─► ControlPlane starts or
                                           stops its reconcile loop and repo watcher
    ReplicaSet (replicas/<id>, leased)  ─► /v1/status "control_plane" (and its "problems":
                                           replicas signing with another key, following
                                           another repository or branch)
    ControlPlaneMetrics ◄── role, role changes, live replicas, the store's state, records written

`Replication` holds these parts for service.py, which owns the process. A follower's
`Rollout` is a read-only view reloaded from the mirror; the leader's is writable and
never reloads (it wrote what the store holds). Reloads are coalesced: a release writes
several keys at once and the followers reload once for them. `POST /v1/rollback` on a
follower is forwarded to the leader (`forward`): the leader alone signs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from starmesh.reconciler.election import LeaderElection
from starmesh.reconciler.errors import ReconcilerError, StoreError
from starmesh.reconciler.etcd_client import parse_etcd_url
from starmesh.reconciler.etcd_store import EtcdStore
from starmesh.reconciler.metrics import NO_METRICS, ControlPlaneMetrics, StoreState
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.registry_sync import RegistrySync
from starmesh.reconciler.replicas import ReplicaSet
from starmesh.reconciler.rollout import Rollout

__all__ = ["FORWARD_TIMEOUT", "Forwarded", "Replication", "ReplicaSettings"]

log = logging.getLogger("starmesh.control_plane.ha")

FORWARD_TIMEOUT = 30.0
"""Seconds a follower waits for the leader to answer a forwarded rollback."""
PRUNE_INTERVAL = 30.0
"""Seconds between the leader's clean-ups of forgotten proxies' records."""


@dataclass(frozen=True)
class ReplicaSettings:
    """`--store`, `--replica-id`, `--leader-ttl`; the URL other replicas reach this one at;
    `--store-ca`, `--store-cert`, `--store-key`: HTTPS and a client certificate to etcd."""

    store: str
    replica_id: str
    leader_ttl: float = 10.0
    store_ca: str | None = None
    store_cert: str | None = None
    store_key: str | None = None


@dataclass(frozen=True)
class Forwarded:
    """The leader's answer to a forwarded request: status and JSON body."""

    status: int
    body: bytes


class Replication:
    """The HA parts of one replica (see the module docs); `open` first, then `start`."""

    def __init__(self, settings: ReplicaSettings) -> None:
        self.settings = settings
        try:
            url = parse_etcd_url(settings.store)
        except ValueError as exc:
            raise ReconcilerError(f"--store: {exc}") from None
        self.store = EtcdStore(url, tls=EtcdStore.tls_from(settings.store_ca, settings.store_cert, settings.store_key))
        self.election: LeaderElection | None = None
        self.replicas: ReplicaSet | None = None
        self.sync: RegistrySync | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._reload_due = False
        self._ssl: ssl.SSLContext | None = None

    def open(self) -> None:
        """Read the store into the mirror (blocking; StoreUnavailable when etcd cannot be reached)."""
        self.store.start()

    def fence(self) -> int | None:
        return None if self.election is None else self.election.fence()

    @property
    def leading(self) -> bool:
        return self.election is not None and self.election.is_leader

    def start(
        self,
        url: str,
        registry: Registry,
        rollout: Rollout,
        *,
        on_change: Callable[[bool], None],
        on_release: Callable[[], None],
        client_ssl: ssl.SSLContext | None,
        signing_key: str | None = None,
        repo: str | None = None,
        branch: str | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        """Join: elect, announce this replica, share registrations, follow the rollout (on the loop).
        `signing_key` (the key's id), `repo` and `branch` go into this replica's record, so
        replicas that differ say so (replicas.py); `metrics` gets the replica gauges and counters."""
        loop = asyncio.get_running_loop()
        rid, ttl = self.settings.replica_id, self.settings.leader_ttl
        self._ssl = client_ssl

        def role_changed(leading: bool) -> None:
            if metrics is not None:
                metrics.leader_changed()
            if self.replicas is not None:
                self.replicas.refresh()  # status shows the new role now, not at the next refresh
            on_change(leading)

        self.election = LeaderElection(self.store, rid, url, ttl=ttl, on_change=role_changed)
        election = self.election
        self.replicas = replica_set = ReplicaSet(
            self.store, rid, url, ttl=ttl, role=lambda: "leader" if election.is_leader else "follower",
            key=signing_key, repo=repo, branch=branch,
        )  # fmt: skip
        self.sync = RegistrySync(self.store, registry, rollout, rid, metrics=metrics or NO_METRICS)
        if metrics is not None:
            metrics.observe_replicas(
                leading=lambda: election.is_leader,
                replicas=lambda: len(replica_set.replicas()),
                store=self._store_state,
            )
        self.sync.start(loop)

        def changed(_key: str, _value: bytes | None) -> None:  # on the store's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
                loop.call_soon_threadsafe(self._schedule_reload, rollout, on_release)

        self.store.subscribe("releases/", changed)
        self.store.subscribe("rollout/", changed)
        self._tasks = [
            loop.create_task(election.run(self._stop), name="starmesh-election"),
            loop.create_task(self.replicas.run(self._stop), name="starmesh-replicas"),
            loop.create_task(self._prune_while_leading(), name="starmesh-prune-registrations"),
        ]

    def _store_state(self) -> StoreState:
        health = self.store.health()
        return StoreState(health.kind, health.available)

    def published(self, proxy_id: str) -> None:
        """The API changed a proxy's registration here: share it with the other replicas."""
        if self.sync is not None:
            self.sync.published(proxy_id)

    def _schedule_reload(self, rollout: Rollout, on_release: Callable[[], None]) -> None:
        if self._reload_due:
            return
        self._reload_due = True

        def reload() -> None:
            self._reload_due = False
            if not rollout.writable:
                try:
                    rollout.reload()
                except StoreError as exc:
                    log.error("cannot follow the rollout from the store: %s", exc)
            on_release()

        asyncio.get_running_loop().call_soon(reload)

    async def _prune_while_leading(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PRUNE_INTERVAL)
            if self.leading and self.sync is not None:
                self.sync.prune()  # queues the deletions for the sync's writer

    def to_json(self) -> dict[str, object]:
        """`/v1/status`'s "control_plane" (DESIGN.md: id, leader, replicas; also role, store,
        and problems: how other replicas differ from this one, replicas.py)."""
        leader = None if self.election is None else self.election.leader()
        now = time.time()
        return {
            "id": self.settings.replica_id,
            "role": "leader" if self.leading else "follower",
            "leader": None if leader is None else leader.to_json(),
            "replicas": [] if self.replicas is None else [r.to_json(now=now) for r in self.replicas.replicas()],
            "store": self.store.health().to_json(),
            "problems": [] if self.replicas is None else self.replicas.problems(),
        }

    def leader_url(self) -> str | None:
        """Where the leader answers, None when there is no leader (or this replica leads)."""
        leader = None if self.election is None else self.election.leader()
        if leader is None or leader.id == self.settings.replica_id:
            return None
        return leader.url

    async def forward(self, path: str, body: bytes) -> Forwarded:
        """POST `body` to the leader's `path` (a follower's rollback); ReconcilerError when
        there is no leader or it cannot be reached."""
        url = self.leader_url()
        if url is None:
            raise ReconcilerError("no leader right now (an election is under way): try again in a few seconds")
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(
                    url.rstrip("/") + path, data=body, headers={"content-type": "application/json"}, ssl=self._ssl or True
                ) as answer:
                    return Forwarded(answer.status, await answer.read())
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ReconcilerError(f"the leader at {url} cannot be reached: {type(exc).__name__} {exc}") from exc

    async def stop(self) -> None:
        """Leave cleanly: resign (another replica leads at once), leave the set, flush, close."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for leaving in (
            self.election.resign() if self.election is not None else None,
            self.replicas.leave() if self.replicas is not None else None,
            self.sync.stop() if self.sync is not None else None,
        ):
            if leaving is None:
                continue
            try:
                await leaving
            except StoreError as exc:
                log.warning("leaving the replica set: %s", exc)
        await asyncio.to_thread(self.store.close)
