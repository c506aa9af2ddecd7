"""The proxy registry: heartbeats, reports, staleness, the endpoint table and its long-poll."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from starmesh.reconciler.errors import InvalidRegistration, RegistryFull
from starmesh.reconciler.metrics import Metrics
from starmesh.reconciler.model import ProxyRecord
from starmesh.reconciler.registry import Registry, check_proxy_id
from starmesh.reconciler.rollout import releases_behind

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def registry(clock: Any, **kwargs: float) -> Registry:
    options: dict[str, float] = {"ttl": 30.0, "forget_after": 600.0, "warmup": 0.0, **kwargs}
    return Registry(
        ttl=options["ttl"],
        forget_after=options["forget_after"],
        max_proxies=int(options.get("max_proxies", 100)),
        clock=clock,
        warmup=options["warmup"],
    )


def beat(reg: Registry, proxy_id: str, service: str = "reviews", version: str = "v1", address: str = "127.0.0.1:9081",
         *, release_version: int | None = None, bundle: str | None = None, requests_total: int | None = None) -> None:  # fmt: skip
    reg.heartbeat(
        proxy_id, service, version, address, release_version=release_version, bundle=bundle, requests_total=requests_total
    )


def test_heartbeats_build_the_endpoint_table_and_its_version_counts_changes(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    assert reg.endpoints() == (0, {})
    beat(reg, "r1", address="127.0.0.1:9081")
    beat(reg, "r2", version="v2", address="127.0.0.1:9082")
    beat(reg, "p1", service="productpage", address="[::1]:9080")
    version, table = reg.endpoints()
    assert version == 3
    assert table == {
        "productpage": {"v1": ["[::1]:9080"]},
        "reviews": {"v1": ["127.0.0.1:9081"], "v2": ["127.0.0.1:9082"]},
    }
    clock.now += 10
    beat(reg, "r1", address="127.0.0.1:9081")  # a plain heartbeat changes nothing in the table
    assert reg.endpoints()[0] == 3
    beat(reg, "r1", address="127.0.0.1:9091")  # a new address does
    assert reg.endpoints() == (4, {**table, "reviews": {"v1": ["127.0.0.1:9091"], "v2": ["127.0.0.1:9082"]}})
    beat(reg, "r1", version="v2", address="127.0.0.1:9091")
    assert reg.endpoints()[1]["reviews"] == {"v2": ["127.0.0.1:9082", "127.0.0.1:9091"]}
    assert reg.heartbeat_seconds == 10.0


def test_a_silent_proxy_goes_stale_leaves_the_table_and_is_forgotten_later(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock, ttl=30, forget_after=100)
    beat(reg, "r1", address="127.0.0.1:9081")
    beat(reg, "r2", address="127.0.0.1:9082")
    clock.now += 20
    beat(reg, "r2", address="127.0.0.1:9082")
    clock.now += 10  # r1: exactly ttl since its heartbeat: not stale yet
    assert reg.live_ids() == ["r1", "r2"]
    clock.now += 1
    assert reg.sweep() == ["r1"]
    assert reg.sweep() == []
    assert reg.live_ids() == ["r2"]
    stale = reg.get("r1")
    assert stale is not None and stale.stale
    assert [(e.id, e.stale) for e in reg.entries()] == [("r1", True), ("r2", False)]
    assert reg.endpoints() == (3, {"reviews": {"v1": ["127.0.0.1:9082"]}})

    beat(reg, "r1", address="127.0.0.1:9081")  # a heartbeat revives it
    assert reg.live_ids() == ["r1", "r2"] and reg.endpoints()[0] == 4

    clock.now += 31  # both stale now (reads sweep: no explicit sweep needed)
    assert reg.live_ids() == [] and reg.endpoints() == (5, {})
    clock.now += 70  # 101 s since r1's last contact: forgotten
    assert reg.get("r1") is None and reg.entries() == []


def test_two_proxies_on_one_address_leave_it_in_the_table_until_both_are_gone(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    beat(reg, "a", address="127.0.0.1:9081")
    clock.now += 20
    beat(reg, "b", address="127.0.0.1:9081")
    assert reg.endpoints()[0] == 1
    clock.now += 15  # a is stale, b is not: the table's content is the same
    assert reg.live_ids() == ["b"]
    assert reg.endpoints() == (1, {"reviews": {"v1": ["127.0.0.1:9081"]}})
    clock.now += 20
    assert reg.endpoints() == (2, {})


def test_reports_record_acks_and_nacks_and_count_as_contact(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    with pytest.raises(KeyError):
        reg.report("nobody", 1, DIGEST_A, None)
    beat(reg, "r1")
    reg.report("r1", 3, DIGEST_A, None)
    entry = reg.get("r1")
    assert entry is not None
    assert (entry.release_version, entry.bundle, entry.error) == (3, DIGEST_A, None)

    reg.report("r1", 4, DIGEST_B, "golden request 'x' failed " + "!" * 5000)
    entry = reg.get("r1")
    assert entry is not None
    assert (entry.release_version, entry.bundle) == (3, DIGEST_A)  # it still runs 3
    assert (entry.nacked_version, entry.nacked_bundle) == (4, DIGEST_B)
    assert entry.error is not None and entry.error.startswith("golden request 'x' failed") and len(entry.error) <= 1000

    clock.now += 31
    assert reg.live_ids() == []
    reg.report("r1", 5, DIGEST_B, None)  # a report is contact too: live again, and back in the table
    entry = reg.get("r1")
    assert entry is not None and not entry.stale
    assert (entry.release_version, entry.bundle, entry.error, entry.nacked_version) == (5, DIGEST_B, None, None)
    assert reg.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9081"]}}

    record = Registry.record(entry, "synced")
    assert isinstance(record, ProxyRecord)
    assert record.to_json() == {
        "id": "r1", "service": "reviews", "version": "v1", "address": "127.0.0.1:9081", "release_version": 5,
        "bundle": DIGEST_B, "state": "synced", "error": None, "last_seen": entry.last_seen,
        "last_seen_seconds_ago": None, "desired_release_version": None, "releases_behind": None, "request_rate": None,
    }  # fmt: skip
    aged = Registry.record(entry, "synced", now=clock.now + 1.5, desired=5, behind=0).to_json()
    assert (aged["last_seen_seconds_ago"], aged["desired_release_version"], aged["releases_behind"]) == (1.5, 5, 0)


def test_a_heartbeat_tells_what_the_proxy_runs_but_never_lowers_it(h: Any) -> None:
    reg = registry(h.Clock(1000.0))
    beat(reg, "r1", release_version=7, bundle=DIGEST_A)  # e.g. after a control-plane restart
    entry = reg.get("r1")
    assert entry is not None and (entry.release_version, entry.bundle) == (7, DIGEST_A)
    reg.report("r1", 8, DIGEST_B, None)
    beat(reg, "r1", release_version=7, bundle=DIGEST_A)  # sent before the ACK, arrived after it
    entry = reg.get("r1")
    assert entry is not None and (entry.release_version, entry.bundle) == (8, DIGEST_B)
    beat(reg, "r1")  # no claim: keeps what it knows
    entry = reg.get("r1")
    assert entry is not None and entry.release_version == 8


@pytest.mark.parametrize(
    ("proxy_id", "service", "version", "address", "bundle", "message"),
    [
        ("bad/id", "reviews", "v1", "127.0.0.1:1", None, "invalid proxy id"),
        ("x" * 129, "reviews", "v1", "127.0.0.1:1", None, "invalid proxy id"),
        ("", "reviews", "v1", "127.0.0.1:1", None, "invalid proxy id"),
        ("r1", "Reviews", "v1", "127.0.0.1:1", None, "bad service: invalid name \"Reviews\""),
        ("r1", "reviews", "", "127.0.0.1:1", None, "bad version: invalid name"),
        ("r1", "reviews", "v1", "127.0.0.1", None, "bad address: invalid endpoint address"),
        ("r1", "reviews", "v1", "127.0.0.1:70000", None, "bad address: invalid endpoint address"),
        ("r1", "reviews", "v1", "127.0.0.1:1", "sha256:abc", "is not sha256:<64 lowercase hex>"),
    ],
)
def test_malformed_heartbeats_are_refused_and_change_nothing(
    proxy_id: str, service: str, version: str, address: str, bundle: str | None, message: str,
    h: Any,
) -> None:
    reg = registry(h.Clock(1000.0))
    with pytest.raises(InvalidRegistration, match=re.escape(message)):
        reg.heartbeat(proxy_id, service, version, address, release_version=None, bundle=bundle)
    assert reg.entries() == [] and reg.endpoints() == (0, {})


def test_proxy_ids() -> None:
    assert check_proxy_id("reviews-v1_7.a") == "reviews-v1_7.a"
    assert check_proxy_id("x" * 128) == "x" * 128
    with pytest.raises(InvalidRegistration):
        check_proxy_id("ä")


def test_the_registry_is_bounded_and_makes_room_only_from_stale_proxies(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock, max_proxies=2)
    beat(reg, "a", address="127.0.0.1:1")
    clock.now += 20
    beat(reg, "b", address="127.0.0.1:2")
    with pytest.raises(RegistryFull, match="holds 2 live proxies"):
        beat(reg, "c", address="127.0.0.1:3")
    beat(reg, "b", address="127.0.0.1:2")  # known proxies still heartbeat
    clock.now += 11  # a is stale now
    beat(reg, "c", address="127.0.0.1:3")
    assert [e.id for e in reg.entries()] == ["b", "c"]


def test_wait_endpoints_answers_changes_and_times_out(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)

    async def main() -> None:
        assert await reg.wait_endpoints(0, 0.05) is None  # nothing yet: the hold runs out
        waiting = asyncio.ensure_future(reg.wait_endpoints(0, 30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        beat(reg, "r1", address="127.0.0.1:9081")
        answer = await waiting  # woken by the change, long before the 30 s hold
        assert answer == (1, {"reviews": {"v1": ["127.0.0.1:9081"]}})
        assert await reg.wait_endpoints(0, 30) == answer  # newer than 0: at once
        assert await reg.wait_endpoints(1, 0.05) is None  # nothing newer than 1

        many = [asyncio.ensure_future(reg.wait_endpoints(1, 30)) for _ in range(5)]
        await asyncio.sleep(0.05)
        clock.now += 31  # r1 goes stale; the sweep wakes every waiter
        reg.sweep()
        assert await asyncio.gather(*many) == [(2, {})] * 5

    asyncio.run(main())


def test_after_a_restart_clients_with_a_table_wait_for_the_warmup(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock, warmup=15)

    async def main() -> None:
        beat(reg, "r1", address="127.0.0.1:9081")
        assert await reg.wait_endpoints(0, 1) == (1, {"reviews": {"v1": ["127.0.0.1:9081"]}})  # a new proxy: at once
        assert await reg.wait_endpoints(57, 0.1) is None  # holds a table from before the restart: not yet
        clock.now += 15
        # warm: a client ahead of this registry's count (its previous incarnation's) gets the table at once
        assert await reg.wait_endpoints(57, 1) == (1, {"reviews": {"v1": ["127.0.0.1:9081"]}})

    asyncio.run(main())


# -- what /v1/status shows of a proxy: its request rate, its age, how far behind it is --------


class CountedNacks(Metrics):
    """Metrics that only count NACKs (the registry's one event)."""

    def __init__(self) -> None:
        self.nacks = 0

    def nacked(self) -> None:
        self.nacks += 1


def test_the_request_rate_is_the_slope_of_the_last_two_counts(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    beat(reg, "r1")  # an older proxy: no count, no rate
    beat(reg, "r1", requests_total=500)
    assert reg.record(reg.entries()[0], "pending", now=clock.now).request_rate is None  # one count is no rate
    clock.now += 5
    beat(reg, "r1", requests_total=520)
    clock.now += 2
    record = reg.record(reg.entries()[0], "pending", now=clock.now)
    assert (record.request_rate, record.last_seen_seconds_ago) == (4.0, 2.0)
    clock.now += 8
    beat(reg, "r1")  # a heartbeat without a count keeps the last two
    assert reg.record(reg.entries()[0], "pending", now=clock.now).request_rate == 4.0
    clock.now += 2
    beat(reg, "r1", requests_total=556)  # over the 12 s since the previous count
    entry = reg.entries()[0]
    assert entry.requests == ((520, 1005.0), (556, 1017.0))
    assert reg.record(entry, "pending", now=clock.now).request_rate == 3.0
    clock.now += 4
    beat(reg, "r1", requests_total=8)  # restarted: counts from 0 again, as Prometheus' rate() has it
    assert reg.record(reg.entries()[0], "pending", now=clock.now).request_rate == 2.0
    report_only = reg.get("r1")
    reg.report("r1", 1, DIGEST_A, None)  # an ACK is contact, not a count
    entry = reg.entries()[0]
    assert report_only is not None and entry.requests == report_only.requests
    clock.now += 31  # stale: no rate (it is not counting anywhere we can see)
    stale = reg.entries()[0]
    assert stale.stale and reg.record(stale, "stale", now=clock.now).request_rate is None
    assert reg.record(stale, "stale", now=clock.now).last_seen_seconds_ago == 31.0
    beat(reg, "r1", requests_total=3)  # back from stale: counts from before the gap are dropped
    back = reg.get("r1")
    assert back is not None and back.requests == ((3, clock.now),)
    assert reg.record(reg.entries()[0], "pending", now=clock.now).request_rate is None


def test_a_negative_count_is_refused_and_changes_nothing(h: Any) -> None:
    reg = registry(h.Clock(1000.0))
    beat(reg, "r1", requests_total=10)
    with pytest.raises(InvalidRegistration, match=r"proxy r1: requests_total -1 is negative"):
        beat(reg, "r1", requests_total=-1)
    entry = reg.get("r1")
    assert entry is not None and entry.requests == ((10, 1000.0),)


def test_nacks_are_counted_and_acks_are_not(h: Any) -> None:
    counted = CountedNacks()
    reg = Registry(ttl=30, warmup=0, clock=h.Clock(1000.0), metrics=counted)
    beat(reg, "r1")
    reg.report("r1", 1, DIGEST_A, None)
    reg.report("r1", 2, DIGEST_B, "release 2: signature by an untrusted key")
    reg.report("r1", 2, DIGEST_B, "release 2: signature by an untrusted key")
    with pytest.raises(KeyError):
        reg.report("nobody", 2, DIGEST_B, "not registered: not counted")
    assert counted.nacks == 2
    assert reg.states(lambda e: "failed" if e.error else "synced") == {"failed": 1}


@pytest.mark.parametrize(
    ("applied", "desired", "issued", "behind"),
    [
        (3, 3, [1, 2, 3], 0),
        (4, 3, [1, 2, 3, 4], 0),  # runs something newer (a canary of a superseded rollout)
        (1, 3, [1, 2, 3], 2),
        (1, 5, [1, 2, 4, 5], 3),  # version 3 was allocated, never issued (a crash between)
        (10, 120, list(range(21, 121)), 110),  # 11-20 were pruned from the history: one each
        (None, 3, [1, 2, 3], None),  # runs nothing from this control plane
        (2, None, [], None),  # nothing is meant for it
    ],
)
def test_releases_behind(applied: int | None, desired: int | None, issued: list[int], behind: int | None) -> None:
    assert releases_behind(applied, desired, issued) == behind


def shared(reg: Registry, proxy_id: str, seen_ago: float, *, address: str = "127.0.0.1:9081", version: str = "v1",
           release_version: int | None = None, bundle: str | None = None, error: str | None = None,
           nacked_version: int | None = None, requests_total: int | None = None) -> bool:  # fmt: skip
    """A record of `proxy_id` from another replica, `seen_ago` seconds old."""
    return reg.apply(
        proxy_id, "reviews", version, address, release_version=release_version, bundle=bundle, error=error,
        nacked_version=nacked_version, nacked_bundle=None if nacked_version is None else DIGEST_B,
        requests_total=requests_total, seen_ago=seen_ago,
    )  # fmt: skip


def test_a_record_from_another_replica_registers_the_proxy_with_its_age(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock, ttl=30, forget_after=100)
    assert shared(reg, "a", 5, release_version=3, bundle=DIGEST_A)
    entry = reg.get("a")
    assert entry is not None and not entry.stale and entry.seen == 995.0
    assert (entry.release_version, entry.bundle) == (3, DIGEST_A)
    assert reg.endpoints() == (1, {"reviews": {"v1": ["127.0.0.1:9081"]}})
    clock.now += 26  # 31 s since its contact
    assert reg.live_ids() == [] and reg.endpoints() == (2, {})

    assert shared(reg, "b", 40)  # older than ttl: known, stale, out of the table
    entry = reg.get("b")
    assert entry is not None and entry.stale and reg.endpoints() == (2, {})
    assert not shared(reg, "c", 101)  # past forget_after: not even known
    assert reg.get("c") is None
    assert shared(reg, "d", -3)  # a replica whose clock runs ahead: contact now, never later
    entry = reg.get("d")
    assert entry is not None and entry.seen == clock.now


def test_a_record_older_than_what_the_registry_holds_changes_nothing(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    beat(reg, "a", release_version=2, bundle=DIGEST_A)
    before = reg.get("a")
    assert not shared(reg, "a", 1, address="127.0.0.1:9999", release_version=5, bundle=DIGEST_B)
    assert reg.get("a") == before and reg.endpoints()[1] == {"reviews": {"v1": ["127.0.0.1:9081"]}}
    clock.now += 10
    assert shared(reg, "a", 1, address="127.0.0.1:9999", release_version=1, bundle=DIGEST_B, error="bad",
                  nacked_version=4)  # fmt: skip
    entry = reg.get("a")
    assert entry is not None and entry.address == "127.0.0.1:9999"
    assert (entry.release_version, entry.bundle) == (2, DIGEST_A)  # never backwards
    assert (entry.error, entry.nacked_version, entry.nacked_bundle) == ("bad", 4, DIGEST_B)
    assert reg.endpoints() == (2, {"reviews": {"v1": ["127.0.0.1:9999"]}})


def test_records_keep_the_endpoint_counts_exact(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    beat(reg, "a", address="127.0.0.1:9081")
    shared(reg, "b", 0, address="127.0.0.1:9081")  # two proxies, one address
    assert reg.endpoints()[0] == 1
    clock.now += 1
    shared(reg, "b", 0, address="127.0.0.1:9081")  # a plain refresh changes nothing
    shared(reg, "a", 0, address="127.0.0.1:9081")
    assert reg.endpoints()[0] == 1
    clock.now += 1
    shared(reg, "b", 0, version="v2", address="127.0.0.1:9082")
    assert reg.endpoints() == (2, {"reviews": {"v1": ["127.0.0.1:9081"], "v2": ["127.0.0.1:9082"]}})
    assert reg.forget("b") and not reg.forget("b")
    assert reg.endpoints() == (3, {"reviews": {"v1": ["127.0.0.1:9081"]}})
    assert reg.forget("a") and reg.endpoints() == (4, {}) and reg.entries() == []


def test_an_older_record_takes_its_place_so_sweep_still_finds_the_oldest(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock, ttl=30)
    beat(reg, "a")
    clock.now += 10
    beat(reg, "b")
    shared(reg, "c", 5)  # last contact at 1005: between a (1000) and b (1010)
    shared(reg, "d", 1)  # 1009: between c and b too
    clock.now += 26
    assert reg.sweep() == ["a", "c"]  # 36 s and 31 s; d 27 s, b 26 s
    clock.now += 4
    assert reg.sweep() == ["d"]  # 31 s; b exactly ttl
    clock.now += 1
    assert reg.sweep() == ["b"]

def test_a_record_carries_the_request_count_into_the_rate(h: Any) -> None:
    clock = h.Clock(1000.0)
    reg = registry(clock)
    shared(reg, "a", 0, requests_total=100)
    clock.now += 10
    shared(reg, "a", 0)  # a report: no count
    clock.now += 10
    shared(reg, "a", 0, requests_total=300)
    entry = reg.get("a")
    assert entry is not None and entry.request_rate() == 10.0


def test_a_malformed_record_is_refused_and_changes_nothing(h: Any) -> None:
    reg = registry(h.Clock(1000.0), max_proxies=1)
    with pytest.raises(InvalidRegistration, match="nacked_version"):
        shared(reg, "a", 0, error="bad", nacked_version=-1)
    with pytest.raises(InvalidRegistration, match="address"):
        shared(reg, "a", 0, address="nowhere")
    assert reg.entries() == []
    shared(reg, "a", 0)
    with pytest.raises(RegistryFull):
        shared(reg, "b", 0)
