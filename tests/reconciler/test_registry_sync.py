"""Registrations shared between two replicas through a real etcd (registry_sync.py).

Each replica has its own EtcdStore, Registry, Rollout and RegistrySync on one etcd; a
proxy "talks to" a replica by the test calling that replica's registry and then
`published`, as the API does."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from starmesh.reconciler.etcd_client import parse_etcd_url
from starmesh.reconciler.etcd_store import EtcdStore
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.model import ReleaseRecord
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.registry_sync import PROXIES_PREFIX, RegistrationRecord, RegistrySync
from starmesh.reconciler.rollout import Rollout, RolloutPolicy

LIVE = ["p1", "p2", "p3", "p4"]


@dataclass
class Replica:
    """One control-plane replica's registration parts."""

    name: str
    store: EtcdStore
    registry: Registry
    ledger: Ledger
    rollout: Rollout
    sync: RegistrySync

    def heartbeat(self, proxy_id: str, address: str, *, release: ReleaseRecord | None = None) -> None:
        self.registry.heartbeat(
            proxy_id, "reviews", "v1", address, release_version=None if release is None else release.version,
            bundle=None if release is None else release.bundle,
        )  # fmt: skip
        self.sync.published(proxy_id)

    def report(self, proxy_id: str, release: ReleaseRecord, error: str | None = None) -> None:
        self.registry.report(proxy_id, release.version, release.bundle, error)
        self.rollout.on_report(proxy_id, release.version, release.bundle, error)
        self.sync.published(proxy_id)

    def live(self, proxy_id: str) -> bool:
        entry = self.registry.get(proxy_id)
        return entry is not None and not entry.stale


Start = Callable[..., Awaitable[Replica]]


@pytest.fixture
def replicas(etcd_server: Any, tmp_path: Path, h: Any) -> Callable[[], Any]:
    """An async context manager making replicas on the test's etcd, all stopped at its end."""
    signer = h.keys(tmp_path / "keys").signer()

    @asynccontextmanager
    async def make() -> AsyncIterator[Start]:
        started: list[Replica] = []

        async def start(
            name: str, *, writable: bool = False, forget_after: float = 600.0, ttl: float = 30.0,
            clock: Callable[[], float] = time.monotonic, wrap: Callable[[EtcdStore], Any] = lambda s: s, **sync_options: Any,
        ) -> Replica:  # fmt: skip
            store = EtcdStore(parse_etcd_url(etcd_server.url), timeout=2.0, probe_interval=0.2)
            await asyncio.to_thread(store.start)
            registry = Registry(ttl=ttl, forget_after=forget_after, warmup=0, clock=clock)
            ledger = Ledger(store)
            rollout = Rollout(ledger, Issuer(ledger, signer), registry, writable=writable)
            sync = RegistrySync(wrap(store), registry, rollout, name, **sync_options)
            replica = Replica(name, store, registry, ledger, rollout, sync)
            started.append(replica)
            sync.start(asyncio.get_running_loop())
            return replica

        try:
            yield start
        finally:
            for replica in started:
                await replica.sync.stop()
                await asyncio.to_thread(replica.store.close)

    return make


def put_record(store: EtcdStore, proxy_id: str, *, age: float, replica: str = "elsewhere") -> None:
    """A record written as a replica that is not in the test would write it, `age` s old."""
    record = RegistrationRecord(proxy_id, "reviews", "v1", "127.0.0.1:9500", None, None, None, None, None, None,
                                time.time() - age, replica)  # fmt: skip
    store.put(PROXIES_PREFIX + proxy_id, msgspec.json.encode(record))


def issue(tmp: Path, h: Any, leader: Replica, v1: int, percent: int = 0) -> ReleaseRecord:
    data = h.compile_policy(tmp / f"policy-{v1}-{percent}", h.rollout_policy(v1, percent=percent))
    record = leader.rollout.issuer.issue(leader.ledger.put_bundle(data), commit=f"commit-{v1}", reason="commit")
    leader.rollout.start(record, RolloutPolicy.from_bundle(data))
    return record


def test_a_heartbeat_on_one_replica_registers_the_proxy_on_the_other(replicas: Any, h: Any) -> None:
    async def main() -> None:
        async with replicas() as start:
            a, b = await start("a"), await start("b")
            a.heartbeat("p1", "127.0.0.1:9001")
            await h.until(lambda: b.live("p1"), "p1 live on replica b")
            assert b.registry.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9001"]}}
            raw = b.store.get(PROXIES_PREFIX + "p1")
            assert raw is not None
            stored = msgspec.json.decode(raw, type=RegistrationRecord)
            assert (stored.id, stored.address, stored.replica) == ("p1", "127.0.0.1:9001", "a")

            a.heartbeat("p1", "127.0.0.1:9011")  # moves: b's table follows
            await h.until(lambda: b.registry.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9011"]}}, "new address")
            c = await start("c")  # a replica that joins later reads the records there
            assert c.live("p1") and c.registry.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9011"]}}

    h.run(main)


def test_acks_and_a_nack_on_a_follower_drive_the_leaders_rollout(replicas: Any, h: Any, tmp_path: Path) -> None:
    async def main() -> None:
        async with replicas() as start:
            leader, follower = await start("leader", writable=True), await start("follower")
            for n, proxy_id in enumerate(LIVE):
                follower.heartbeat(proxy_id, f"127.0.0.1:{9001 + n}")
            await h.until(lambda: all(leader.live(p) for p in LIVE), "every proxy live on the leader")
            first = issue(tmp_path, h, leader, 100)
            for proxy_id in LIVE:
                follower.report(proxy_id, first)  # ACKs, all to the follower
            await h.until(lambda: leader.rollout.to_json()["phase"] == "complete", "the first release complete")

            new = issue(tmp_path, h, leader, 0, percent=50)
            assert await asyncio.to_thread(follower.store.wait_synced, h.DEADLINE)
            follower.rollout.reload()  # the lead wires this to the store's watch
            canary = leader.rollout.to_json()["canary"]
            assert isinstance(canary, list) and len(canary) == 2
            assert follower.rollout.release_for(canary[0]) == new
            follower.report(canary[0], new, "golden request 'x' failed")
            await h.until(lambda: leader.rollout.to_json()["phase"] == "halted", "the canary rollout halted")
            failures = leader.rollout.to_json()["failures"]
            assert failures == [{"proxy": canary[0], "reason": f"NACK of release {new.version}: golden request 'x' failed"}]
            halt = leader.ledger.current()
            assert halt is not None and halt.reason == "halt" and halt.bundle == first.bundle

    h.run(main)


def test_an_old_record_arrives_stale_and_a_forgotten_one_not_at_all(replicas: Any, h: Any) -> None:
    async def main() -> None:
        async with replicas() as start:
            a, b = await start("a"), await start("b")
            put_record(a.store, "old", age=45)  # past ttl (30)
            put_record(a.store, "gone", age=700)  # past forget_after (600)
            put_record(a.store, "own", age=0, replica="a")  # a's own record comes back to a: ignored
            put_record(b.store, "marker", age=0)  # written after the others: a and b see it last
            await h.until(lambda: b.live("marker") and a.live("marker"), "the marker on both")
            old = b.registry.get("old")
            assert old is not None and old.stale and b.registry.get("gone") is None
            assert b.live("own") and a.registry.get("own") is None
            assert b.registry.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9500"]}}

    h.run(main)


def test_the_leader_prunes_the_records_of_proxies_it_forgot(replicas: Any, h: Any) -> None:
    async def main() -> None:
        async with replicas() as start:
            follower = await start("follower")
            leader = await start("leader", writable=True, forget_after=40)
            put_record(leader.store, "old", age=45)  # the follower knows it stale; the leader forgot it
            follower.heartbeat("p1", "127.0.0.1:9001")
            await h.until(lambda: leader.live("p1"), "p1 on the leader")
            old = follower.registry.get("old")
            assert old is not None and old.stale and leader.registry.get("old") is None

            leader.sync.prune()
            await h.until(lambda: leader.store.get(PROXIES_PREFIX + "old") is None, "old's record deleted")
            await h.until(lambda: follower.registry.get("old") is None, "the follower forgets it too")
            assert leader.store.get(PROXIES_PREFIX + "p1") is not None  # a known proxy's record stays
            await asyncio.to_thread(leader.sync.prune)  # from a worker thread, as a task may call it
            await asyncio.sleep(0.3)
            assert leader.store.get(PROXIES_PREFIX + "p1") is not None and follower.live("p1")

    h.run(main)


def test_records_published_while_etcd_is_down_are_written_once_it_is_back(
    replicas: Any, h: Any, etcd_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "starmesh.reconciler.registry_sync")

    async def main() -> None:
        async with replicas() as start:
            a, b = await start("a"), await start("b")
            a.heartbeat("p1", "127.0.0.1:9001")
            await h.until(lambda: b.live("p1"), "p1 on b")
            etcd_server.kill()
            a.heartbeat("p2", "127.0.0.1:9002")
            a.heartbeat("p1", "127.0.0.1:9011")
            await h.until(lambda: "cannot write proxies' records" in caplog.text, "the writer failing")
            assert not b.live("p2")
            await asyncio.to_thread(etcd_server.start)
            await h.until(lambda: b.live("p2"), "p2 on b once etcd is back")
            await h.until(lambda: b.registry.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9002", "127.0.0.1:9011"]}},
                          "b's table with both proxies' newest addresses")  # fmt: skip
            assert caplog.text.count("cannot write proxies' records") == 1  # once per failure, not per try
            assert "writing proxies' records again" in caplog.text

    h.run(main)


# -- fewer writes: a record when it says something new, or to keep the proxy live elsewhere --


def test_unchanged_heartbeats_are_written_once_per_refresh_window_and_changes_at_once(replicas: Any, h: Any) -> None:
    async def main() -> None:
        async with replicas() as start:
            clock = h.Clock(1000.0)
            a, b = await start("a", clock=clock), await start("b")  # ttl 30: a refresh after 15 s
            assert a.sync.refresh == 15

            def beat(count: int, address: str = "127.0.0.1:9001") -> None:
                a.registry.heartbeat("p1", "reviews", "v1", address, release_version=None, bundle=None,
                                     requests_total=count)  # fmt: skip
                a.sync.published("p1")

            def stored() -> RegistrationRecord:
                raw = a.store.get(PROXIES_PREFIX + "p1")
                assert raw is not None
                return msgspec.json.decode(raw, type=RegistrationRecord)

            beat(0)
            await h.until(lambda: b.live("p1"), "p1 on b")
            written_counts = []
            for n in range(1, 6):  # heartbeats every ttl/3 (10 s), unchanged: written at 20 and 40 s only
                clock.now += 10
                beat(n)
                a.heartbeat(f"marker{n}", f"127.0.0.1:{9100 + n}")  # queued after p1: written with it or after
                await h.until(lambda: a.store.get(f"{PROXIES_PREFIX}marker{n}") is not None, f"marker {n} written")
                written_counts.append(stored().requests_total)  # the count rides along with each write
            assert written_counts == [0, 2, 2, 4, 4]
            await h.until(lambda: a.sync.written == 3 + 5, "p1 three times, five markers")

            clock.now += 1  # well inside the window: a change goes out at once
            a.heartbeat("p1", "127.0.0.1:9011")
            await h.until(lambda: (e := b.registry.get("p1")) is not None and e.address == "127.0.0.1:9011",
                          "p1's new address on b")  # fmt: skip
            clock.now += 1
            a.registry.report("p1", 3, "sha256:" + "ab" * 32, None)  # an ACK: written at once too
            a.sync.published("p1")
            await h.until(lambda: (e := b.registry.get("p1")) is not None and e.release_version == 3, "p1's ACK on b")
            await h.until(lambda: a.sync.written == 10, "the change and the ACK counted")
            clock.now += 1
            beat(7, "127.0.0.1:9011")  # and an unchanged heartbeat right after is not
            a.heartbeat("marker6", "127.0.0.1:9106")
            await h.until(lambda: a.sync.written == 11, "the last marker")
            assert stored().requests_total is None  # from the ACK's record, not the heartbeat's

    h.run(main)


def test_the_other_replica_never_sees_a_heartbeating_proxy_go_stale(replicas: Any, h: Any) -> None:
    async def main() -> None:
        async with replicas() as start:
            ttl = 3.0  # heartbeats every 1 s; a record at least every 2 s; stale after 3 s without one
            a, b = await start("a", ttl=ttl), await start("b", ttl=ttl)
            a.heartbeat("p1", "127.0.0.1:9001")
            await h.until(lambda: b.live("p1"), "p1 on b")
            seen_stale = False
            done = asyncio.Event()

            async def watch_b() -> None:
                nonlocal seen_stale
                while not done.is_set():
                    seen_stale = seen_stale or not b.live("p1")
                    await asyncio.sleep(0.05)

            watching = asyncio.create_task(watch_b())
            beats = 7
            for _ in range(beats):
                await asyncio.sleep(ttl / 3)
                a.heartbeat("p1", "127.0.0.1:9001")
            done.set()
            await watching
            assert not seen_stale and a.sync.written > 1  # refreshed, never stale

    h.run(main)


class CountingStore:
    """The real store, counting `put_many` calls and what each wrote."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.batches: list[list[str]] = []
        self.get, self.keys, self.subscribe = store.get, store.keys, store.subscribe

    def put_many(self, items: Mapping[str, bytes | None]) -> None:
        self.store.put_many(items)
        self.batches.append(sorted(items))


def test_the_writer_lingers_for_a_batch_until_it_is_full(replicas: Any, h: Any) -> None:
    async def main() -> None:
        async with replicas() as start:
            counted: list[CountingStore] = []

            def wrap(store: EtcdStore) -> CountingStore:
                counted.append(CountingStore(store))
                return counted[-1]

            a = await start("a", wrap=wrap, linger=3600.0, max_batch=3)  # lingers for ever unless full
            for n in range(3):
                a.heartbeat(f"p{n}", f"127.0.0.1:{9001 + n}")
                await asyncio.sleep(0.05)  # the writer has woken up for the first one meanwhile
            await h.until(lambda: a.sync.written == 3, "the full batch written")
            assert counted[0].batches == [["proxies/p0", "proxies/p1", "proxies/p2"]]  # in one put_many

    h.run(main)
