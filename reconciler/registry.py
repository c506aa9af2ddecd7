"""The registry of proxies: who is live, where each can be reached, and what each runs.

    heartbeat / report ──► live ──(no heartbeat or report for `ttl` s)──► stale ──(`forget_after` s
         ▲                  │  in the endpoint table                     │ out of it      since last seen)
         └──────────────────┴────────────── a heartbeat revives ─────────┘                ──► forgotten

A proxy registers and heartbeats with `heartbeat(id, service, version, address, ...)`
(POST /v1/proxies/<id>); its address (its `--inbound`) goes into the endpoint table under
its service and version while it is live. `report` records an ACK or NACK (POST
/v1/proxies/<id>/status). The heartbeat may also carry the release the proxy runs: after
a control-plane restart that is how the registry learns what each proxy runs, and
its `requests_total` (every request the proxy answered since it started; older proxies
omit it): the registry keeps the last two counts, and a proxy's request rate is the
slope between them (`ProxyEntry.request_rate`).

Live and stale proxies sit in two insertion-ordered maps kept in order of last contact,
so `sweep` looks only at the oldest entries: every read sweeps, at no cost while
nothing is due. The endpoint table is kept as counts per address, so a heartbeat costs
O(1) and the table's `version` moves only when its content changes (an address appears
or disappears), never on a plain heartbeat. Long-polls (`wait_endpoints`) wait on a
`ChangeSignal` that wakes them all at once.

After a restart the registry is empty until proxies heartbeat again. For its first
`warmup` seconds it answers an endpoint long-poll only from a client that has no table
yet (`after` 0): a proxy holding a table from before the restart keeps it rather than
get a half-filled one. After the warm-up a client ahead of the registry (`after` above
`version`, a table numbered by the previous incarnation) gets the current table at once.

`max_proxies` bounds the registry: a new proxy displaces the longest-stale one, and
when every known proxy is live it is refused with `RegistryFull`.

With several control-plane replicas (issue 9) a proxy talks to one of them, and the
others learn of it from its record in the store (registry_sync.py): `apply` takes such a
record in, `seen_ago` seconds old, in its place by last contact (stale when that is past
`ttl`, dropped past `forget_after`), never older than what the registry holds and never
lowering the release a proxy runs. `forget` drops a proxy whose record was deleted.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from starmesh.bundle.canonical import is_digest
from starmesh.compiler.values import ValueProblem, check_endpoint, check_name
from starmesh.reconciler.change_signal import ChangeSignal
from starmesh.reconciler.errors import InvalidRegistration, RegistryFull
from starmesh.reconciler.metrics import NO_METRICS, Metrics
from starmesh.reconciler.model import ProxyEntry, ProxyRecord, ProxyState, utc_now

__all__ = ["EndpointTable", "Registry", "check_proxy_id"]

EndpointTable = dict[str, dict[str, list[str]]]
"""service → version → ["host:port", ...] (sorted), as `/v1/endpoints` answers it."""

_PROXY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_ERROR = 1000


def check_proxy_id(proxy_id: str) -> str:
    """A proxy id: 1-128 of letters, digits, `.`, `_`, `-`; InvalidRegistration otherwise."""
    if not _PROXY_ID.fullmatch(proxy_id):
        raise InvalidRegistration(
            f"invalid proxy id {proxy_id[:140]!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return proxy_id


class Registry:
    """Live proxies and the endpoint table they make (see the module docs)."""

    def __init__(
        self,
        *,
        ttl: float = 30.0,
        forget_after: float = 600.0,
        max_proxies: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        warmup: float | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        if ttl <= 0 or forget_after < ttl or max_proxies < 1:
            raise ValueError(
                f"registry needs ttl > 0, forget_after >= ttl and max_proxies >= 1 "
                f"(got ttl={ttl}, forget_after={forget_after}, max_proxies={max_proxies})"
            )
        self.ttl = ttl
        self.forget_after = forget_after
        self.max_proxies = max_proxies
        self.heartbeat_seconds = ttl / 3
        self.clock = clock
        self.metrics = metrics
        self._warm_at = clock() + (ttl / 2 if warmup is None else warmup)
        self._live: OrderedDict[str, ProxyEntry] = OrderedDict()
        self._stale: OrderedDict[str, ProxyEntry] = OrderedDict()
        self._counts: dict[str, dict[str, dict[str, int]]] = {}
        self._version = 0
        self._snapshot: EndpointTable | None = None
        self._changed = ChangeSignal()

    # -- what proxies send ---------------------------------------------------------------

    def heartbeat(
        self,
        proxy_id: str,
        service: str,
        version: str,
        address: str,
        *,
        release_version: int | None,
        bundle: str | None,
        requests_total: int | None = None,
    ) -> None:
        """Register or refresh a proxy; RegistryFull when a new one does not fit."""
        _check_heartbeat(proxy_id, service, version, address, release_version, bundle, requests_total)
        self.sweep()
        old = self._live.pop(proxy_id, None)
        was_live = old is not None
        if old is None:
            old = self._stale.pop(proxy_id, None)
        if old is None:
            self._make_room(proxy_id)
        now = self.clock()
        if old is None:
            entry = ProxyEntry(proxy_id, service, version, address, now, utc_now(), release_version, bundle)
        else:
            # counts from before it went stale would make a rate over the outage: dropped
            entry = replace(
                old, service=service, version=version, address=address, seen=now, last_seen=utc_now(), stale=False,
                requests=old.requests if was_live else (),
            )  # fmt: skip
            if release_version is not None and (old.release_version is None or release_version >= old.release_version):
                entry = replace(entry, release_version=release_version, bundle=bundle)
        if requests_total is not None:
            entry = replace(entry, requests=(*entry.requests[-1:], (requests_total, now)))
        self._live[proxy_id] = entry
        if was_live and old is not None:
            if (old.service, old.version, old.address) == (service, version, address):
                return
            removed = self._remove_address(old)
            added = self._add_address(entry)
            changed = removed or added
        else:
            changed = self._add_address(entry)
        if changed:
            self._bump()

    def report(self, proxy_id: str, version: int | None, bundle: str | None, error: str | None) -> None:
        """Record an ACK (`error` None) or a NACK; KeyError when the proxy is not registered."""
        if version is not None and version < 0:
            raise InvalidRegistration(f"proxy {proxy_id} reported release version {version}: versions are >= 0")
        if bundle is not None and not is_digest(bundle):
            raise InvalidRegistration(f"proxy {proxy_id} reported bundle {bundle[:80]!r}: not sha256:<64 hex>")
        self.sweep()
        old = self._live.pop(proxy_id, None)
        revived = old is None
        if old is None:
            old = self._stale.pop(proxy_id, None)
        if old is None:
            raise KeyError(proxy_id)
        touched = replace(old, seen=self.clock(), last_seen=utc_now(), stale=False)
        if error is None:
            entry = replace(
                touched, release_version=version, bundle=bundle, error=None, nacked_version=None, nacked_bundle=None
            )
        else:
            entry = replace(touched, error=_truncate(error), nacked_version=version, nacked_bundle=bundle)
            self.metrics.nacked()
        self._live[proxy_id] = entry
        if revived and self._add_address(entry):
            self._bump()

    # -- what other replicas share ----------------------------------------------------------

    def apply(
        self,
        proxy_id: str,
        service: str,
        version: str,
        address: str,
        *,
        release_version: int | None,
        bundle: str | None,
        error: str | None,
        nacked_version: int | None,
        nacked_bundle: str | None,
        requests_total: int | None,
        seen_ago: float,
    ) -> bool:
        """Take in a proxy's record from another replica, last in contact `seen_ago` seconds
        ago (clamped to >= 0). False when it changes nothing: the registry knows of a contact
        as recent or later, or the record is past `forget_after`. Refused as `heartbeat`
        refuses (InvalidRegistration, RegistryFull)."""
        _check_heartbeat(proxy_id, service, version, address, release_version, bundle, requests_total)
        if nacked_version is not None and nacked_version < 0:
            raise InvalidRegistration(f"proxy {proxy_id}: nacked_version {nacked_version} is negative")
        if nacked_bundle is not None and not is_digest(nacked_bundle):
            raise InvalidRegistration(f"proxy {proxy_id}: nacked_bundle {nacked_bundle[:80]!r} is not sha256:<hex>")
        self.sweep()
        age = max(0.0, seen_ago)
        seen = self.clock() - age
        was_live = proxy_id in self._live
        old = self._live.get(proxy_id) if was_live else self._stale.get(proxy_id)
        if age > self.forget_after or (old is not None and old.seen >= seen):
            return False
        if old is None:
            self._make_room(proxy_id)
        live = age <= self.ttl
        if old is not None and old.release_version is not None:
            if release_version is None or release_version < old.release_version:  # never backwards
                release_version, bundle = old.release_version, old.bundle
        requests = old.requests if old is not None and was_live and live else ()
        if requests_total is not None and live:
            requests = (*requests[-1:], (requests_total, seen))
        entry = ProxyEntry(
            proxy_id, service, version, address, seen, _utc(time.time() - age), release_version, bundle,
            None if error is None else _truncate(error), nacked_version, nacked_bundle, not live, requests,
        )  # fmt: skip
        self._live.pop(proxy_id, None)
        self._stale.pop(proxy_id, None)
        _insert_by_seen(self._live if live else self._stale, entry)
        if was_live and live and old is not None and (old.service, old.version, old.address) == (service, version, address):
            return True
        changed = was_live and old is not None and self._remove_address(old)
        changed = (live and self._add_address(entry)) or changed
        if changed:
            self._bump()
        return True

    def forget(self, proxy_id: str) -> bool:
        """Drop a proxy now (its record was deleted: another replica forgot it); True if known."""
        entry = self._live.pop(proxy_id, None)
        if entry is not None:
            if self._remove_address(entry):
                self._bump()
            return True
        return self._stale.pop(proxy_id, None) is not None

    def _make_room(self, proxy_id: str) -> None:
        """Room for one more proxy: the longest-stale one goes; RegistryFull when all are live."""
        if len(self._live) + len(self._stale) < self.max_proxies:
            return
        if not self._stale:
            raise RegistryFull(
                f"the registry holds {self.max_proxies} live proxies (max_proxies); proxy {proxy_id} "
                "is refused: raise the limit or retire proxies"
            )
        self._stale.popitem(last=False)

    # -- staleness -----------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Mark proxies silent for `ttl` stale and forget the long gone; returns the newly stale ids."""
        now = self.clock()
        newly: list[str] = []
        changed = False
        while self._live:
            proxy_id, entry = next(iter(self._live.items()))
            if now - entry.seen <= self.ttl:
                break
            del self._live[proxy_id]
            self._stale[proxy_id] = replace(entry, stale=True)
            newly.append(proxy_id)
            changed = self._remove_address(entry) or changed
        while self._stale:
            proxy_id, entry = next(iter(self._stale.items()))
            if now - entry.seen <= self.forget_after:
                break
            del self._stale[proxy_id]
        if changed:
            self._bump()
        return newly

    # -- reads -----------------------------------------------------------------------------

    def get(self, proxy_id: str) -> ProxyEntry | None:
        self.sweep()
        return self._live.get(proxy_id) or self._stale.get(proxy_id)

    def entries(self) -> list[ProxyEntry]:
        """Every known proxy, stale ones too, sorted by id."""
        self.sweep()
        return sorted([*self._live.values(), *self._stale.values()], key=lambda e: e.id)

    def live_ids(self) -> list[str]:
        self.sweep()
        return sorted(self._live)

    @staticmethod
    def record(
        entry: ProxyEntry,
        state: ProxyState,
        *,
        now: float | None = None,
        desired: int | None = None,
        behind: int | None = None,
    ) -> ProxyRecord:
        """The `/v1/status` record of an entry (`entry.to_record`): `now` is the registry's clock."""
        return entry.to_record(state, now=now, desired=desired, behind=behind)

    def states(self, state_of: Callable[[ProxyEntry], ProxyState]) -> dict[ProxyState, int]:
        """How many known proxies are in each state (`state_of` gives one's: the rollout's)."""
        counts: dict[ProxyState, int] = {}
        for entry in self.entries():
            state = state_of(entry)
            counts[state] = counts.get(state, 0) + 1
        return counts

    def endpoints(self) -> tuple[int, EndpointTable]:
        """(version, table of live proxies); the table is shared: read it, do not change it."""
        self.sweep()
        if self._snapshot is None:
            self._snapshot = {
                service: {version: sorted(addresses) for version, addresses in sorted(versions.items())}
                for service, versions in sorted(self._counts.items())
            }
        return self._version, self._snapshot

    async def wait_endpoints(self, after: int, timeout: float) -> tuple[int, EndpointTable] | None:
        """The table once its version differs from what the client holds (see the module
        docs), or None when `timeout` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            version, table = self.endpoints()
            if self._answers(after, version):
                return version, table
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if after > 0 and not self._warm():
                remaining = min(remaining, max(0.05, self._warm_at - self.clock()))
            await self._changed.wait(remaining)

    def _answers(self, after: int, version: int) -> bool:
        if after > 0 and not self._warm():
            return False
        return version > after or (after > version and version > 0)

    def _warm(self) -> bool:
        return self.clock() >= self._warm_at

    # -- the endpoint table ----------------------------------------------------------------

    def _add_address(self, entry: ProxyEntry) -> bool:
        counts = self._counts.setdefault(entry.service, {}).setdefault(entry.version, {})
        counts[entry.address] = counts.get(entry.address, 0) + 1
        return counts[entry.address] == 1

    def _remove_address(self, entry: ProxyEntry) -> bool:
        versions = self._counts.get(entry.service)
        counts = versions.get(entry.version) if versions is not None else None
        if versions is None or counts is None or entry.address not in counts:
            return False
        counts[entry.address] -= 1
        if counts[entry.address] > 0:
            return False
        del counts[entry.address]
        if not counts:
            del versions[entry.version]
        if not versions:
            del self._counts[entry.service]
        return True

    def _bump(self) -> None:
        self._version += 1
        self._snapshot = None
        self._changed.notify()


def _check_heartbeat(
    proxy_id: str,
    service: str,
    version: str,
    address: str,
    release_version: int | None,
    bundle: str | None,
    requests_total: int | None,
) -> None:
    check_proxy_id(proxy_id)
    for field, value, check in (("service", service, check_name), ("version", version, check_name),
                                ("address", address, check_endpoint)):  # fmt: skip
        try:
            check(value)
        except ValueProblem as exc:
            raise InvalidRegistration(f"proxy {proxy_id}: bad {field}: {exc} ({exc.hint})") from None
    if release_version is not None and release_version < 0:
        raise InvalidRegistration(f"proxy {proxy_id}: release_version {release_version} is negative")
    if requests_total is not None and requests_total < 0:
        raise InvalidRegistration(f"proxy {proxy_id}: requests_total {requests_total} is negative")
    if bundle is not None and not is_digest(bundle):
        raise InvalidRegistration(f"proxy {proxy_id}: bundle {bundle[:80]!r} is not sha256:<64 lowercase hex>")


def _insert_by_seen(entries: OrderedDict[str, ProxyEntry], entry: ProxyEntry) -> None:
    """Add `entry` in its place by `seen` (sweep reads only the oldest end). A record from
    another replica is a little older than the newest local contacts: the few entries
    newer than it move behind it, so this costs O(those few), not O(all)."""
    entries[entry.id] = entry
    newer = []
    for other_id, other in reversed(entries.items()):
        if other_id == entry.id:
            continue
        if other.seen <= entry.seen:
            break
        newer.append(other_id)
    for other_id in reversed(newer):
        entries.move_to_end(other_id)


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"
