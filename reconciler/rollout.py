"""Staged rollout: which release each proxy gets, and when a release goes further or back.

    start(V) ─► canary ──canaries ACKed──► baking ──bake over──► promoted ──live ACKed──► complete
                  │  ceil(canary_percent% of live)                  │  everyone      (V is stable)
                  │  get V, the rest the stable release             │  gets V
                  └────── more than max_failures failures ──────────┴──► halted: the stable bundle
                                     is issued again as a new version (reason `halt`), for everyone

A failure is a NACK of the rollout's version from a targeted proxy (a canary while
canaries run, anyone once promoted), or a targeted proxy going stale before it ACKed; a
proxy counts once, and "ACKed or failed" is what moving on waits for (failures up to
`max_failures` are tolerated). Only releases of new commits halt: `rollback`, `halt` and
`reissue` releases start promoted and never halt, and so does any release when the
policy asks for no canaries or there is no stable release to fall back to. A new
commit's release during a rollout supersedes it; the stable release stays the last
complete one, and live canaries of the superseded rollout stay canaries (they run
something newer than stable, which a proxy never trades for a lower version).

Canaries are the live proxies first in order of sha256("<version>:<id>"): deterministic,
a different subset for each release. A proxy has ACKed when it reported the release or
its heartbeat says it runs it (after a control-plane restart). The state is persisted
as JSON in the ledger whenever it changes (`RolloutState`, in rollout_state.py with
`RolloutPolicy`, which this module re-exports), the bake deadline as a wall-clock number
from the injectable clock; proxies seen live while promoted are kept in memory only.

A proxy that NACKed version V gets V again only after a hold that doubles with each NACK
of V in a row (1 s, 2 s, 4 s, ... 300 s): `nack_hold` says how much of it is left.

With several replicas (issue 9) only the leader's rollout is writable. A follower's is a
read-only view (`start`, `rollback`, `reissue` raise NotLeader, `tick` does nothing,
`on_report` keeps only NACK holds) that `reload()` re-reads when the leader has written;
`set_writable(True)` reloads and ticks, so a new leader carries on where the store says.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from starmesh.bundle.canonical import decode_bundle
from starmesh.bundle.errors import BundleError
from starmesh.reconciler.change_signal import ChangeSignal
from starmesh.reconciler.errors import NotLeader, ReconcilerError, UnknownBundle
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import RolloutProgress
from starmesh.reconciler.model import ProxyEntry, ProxyState, ReleaseRecord
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout_load import keep_served, load_rollout, save_rollout
from starmesh.reconciler.rollout_state import Phase, RolloutPolicy, RolloutState, stored_policy

__all__ = ["MAX_NACK_HOLD", "Phase", "Rollout", "RolloutPolicy", "releases_behind"]

log = logging.getLogger("starmesh.reconciler.rollout")

MAX_NACK_HOLD = 300.0
"""The longest hold (seconds) before a NACKed release is sent to the same proxy again."""
_MAX_REASON = 1000


@dataclass
class _Nack:
    version: int
    count: int
    at: float


class Rollout:
    """The release each proxy should run, and the rollout's progress (see the module docs)."""

    def __init__(
        self, ledger: Ledger, issuer: Issuer, registry: Registry, *, clock: Callable[[], float] = time.time,
        writable: bool = True,
    ) -> None:  # fmt: skip
        self.ledger, self.issuer, self.registry, self.clock = ledger, issuer, registry, clock
        self.writable = writable
        self._lock = threading.RLock()
        self._changed = ChangeSignal()
        self._targets: set[str] = set()
        self._nacks: dict[str, _Nack] = {}
        self._issued: tuple[int | None, list[int]] = (None, [])
        self._s, self._release, self._stable = load_rollout(ledger)
        if writable:
            self._resume()

    # -- leader or follower ------------------------------------------------------------------

    def set_writable(self, flag: bool) -> None:
        """Become the leader's rollout (True: reload, then carry on from the store's state)
        or a read-only view (False). A corrupt state raises StoreError and leaves it read-only;
        a store error while carrying on is logged and left to the next tick."""
        with self._lock:
            if flag == self.writable:
                return
            if not flag:
                self.writable = False
                return
            self.reload()
            self.writable = True
            try:
                self._resume()
                self.tick()
            except ReconcilerError as exc:
                log.error("rollout: taking over as leader, cannot carry on yet (the next tick tries again): %s", exc)

    def reload(self) -> None:
        """Read `rollout/state` and the releases again (the leader wrote them) and wake the
        release long-polls. NACK holds are kept; proxies targeted while promoted are rebuilt
        from the live ones. StoreError when the state is corrupt (the view is unchanged)."""
        with self._lock:
            s, release, stable = load_rollout(self.ledger)
            same = s is not None and self._s is not None and s.version == self._s.version
            targets = (self._targets if same else set()) | set(self.registry.live_ids())
            self._targets = targets if s is not None and s.phase == "promoted" else set()
            self._s, self._release, self._stable = s, release, stable
            self._issued = (None, [])
        self._changed.notify()

    def _resume(self) -> None:
        """A release issued but never started (a crash, or a leader deposed, in between) starts now."""
        current = self.ledger.current()
        if current is not None and current.version > self._known():
            self.start(current, stored_policy(self.ledger, current.bundle))
        elif self._s is not None:
            keep_served(self.ledger, self._s)

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise NotLeader(f"cannot {what} here: this control-plane replica is not the leader")

    # -- what starts rollouts ----------------------------------------------------------------

    def start(self, release: ReleaseRecord, policy: RolloutPolicy) -> None:
        """Roll out `release`; a version not above the current rollout's is ignored (idempotent).
        NotLeader on a read-only rollout."""
        self._check_writable(f"start the rollout of release {release.version}")
        with self._lock:
            old = self._s
            if release.version <= self._known():
                return
            keep = [p for p in old.canary if self._is_live(p)] if old and old.phase in ("canary", "baking") else []
            staged = release.reason == "commit" and policy.canary_percent > 0 and self._stable is not None
            self._release, self._targets = release, set()
            self._s = RolloutState(release.version, "canary" if staged else "promoted", policy, self._stable_version())
            if staged:
                self._s.canary = self._pick_canaries(keep)
            log.info("rollout of release %d (%s) starts %s", release.version, release.bundle, self._s.phase)
            self._save()
            self._advance()

    def rollback(self, digest: str) -> ReleaseRecord:
        """Release the stored bundle `digest` as a new version, to everyone; UnknownBundle if not
        stored, NotLeader on a read-only rollout."""
        self._check_writable(f"roll back to {digest}")
        data = self.ledger.bundle(digest)
        try:
            commit = decode_bundle(data).source.commit
        except BundleError as exc:
            raise UnknownBundle(f"stored bundle {digest} does not decode: {exc}") from exc
        with self._lock:
            record = self.issuer.issue(digest, commit=commit, reason="rollback")
            self.start(record, stored_policy(self.ledger, digest))
            return record

    def reissue(self) -> ReleaseRecord | None:
        """Re-issue the release everyone runs once it is half-way to expiry (not while canaries
        run); NotLeader on a read-only rollout."""
        self._check_writable("re-issue the release")
        with self._lock:
            newest, s = self.release_for(None), self._s
            if s is None or s.phase in ("canary", "baking") or newest is None or not self.issuer.reissue_due(newest):
                return None
            record = self.issuer.issue(newest.bundle, commit=newest.commit, reason="reissue")
            self.start(record, s.policy)
            return record

    # -- what proxies get and tell -------------------------------------------------------------

    def release_for(self, proxy_id: str | None) -> ReleaseRecord | None:
        """The release meant for this proxy (None: a client that names none gets the stable one
        while canaries run, else the newest)."""
        s, release, stable = self._s, self._release, self._stable
        if s is None or release is None:
            return stable
        if s.phase == "halted" or (s.phase in ("canary", "baking") and proxy_id not in s.canary):
            return stable if stable is not None else release
        return release

    def on_report(self, proxy_id: str, version: int | None, bundle: str | None, error: str | None) -> None:
        """An ACK or NACK the registry accepted (a NACK without a version is about the release sent)."""
        with self._lock:
            s, release = self._s, self._release
            if s is None or release is None:
                return
            if error is None:
                self._nacks.pop(proxy_id, None)
                if not self.writable:
                    return
                if bundle == release.bundle and (version or 0) >= release.version and proxy_id not in s.acked:
                    s.acked.add(proxy_id)
                    if proxy_id in s.canary:
                        self._save()
            else:
                meant = self.release_for(proxy_id)
                nacked = version if version is not None else (meant.version if meant is not None else None)
                if nacked is not None:
                    nack = self._nacks.get(proxy_id)
                    count = nack.count + 1 if nack is not None and nack.version == nacked else 1
                    self._nacks[proxy_id] = _Nack(nacked, count, self.clock())
                if not self.writable:
                    return
                if nacked == release.version and self._targeted(proxy_id):
                    self._fail(proxy_id, f"NACK of release {nacked}: {error}")
            self._advance()

    def tick(self) -> None:
        """Check the clock and the registry: bake end, stale targets, NACKs the registry
        holds (reported to another replica, or while there was no leader), completion, halts."""
        with self._lock:
            s = self._s
            if s is None or not self.writable:
                return
            targets = s.canary if s.phase in ("canary", "baking") else sorted(self._targets)
            for proxy_id in targets:
                entry = self.registry.get(proxy_id)
                if (entry is None or entry.stale) and not self._has_acked(proxy_id, entry):
                    self._fail(proxy_id, f"went stale before acknowledging release {s.version}")
                elif entry is not None and entry.error is not None and entry.nacked_version == s.version:
                    self._fail(proxy_id, f"NACK of release {s.version}: {entry.error}")
            self._nacks = {p: n for p, n in self._nacks.items() if self.registry.get(p) is not None}
            self._advance()

    def nack_hold(self, proxy_id: str) -> float:
        """Seconds before the release this proxy NACKed may be sent to it again (0: send now)."""
        nack, meant = self._nacks.get(proxy_id), self.release_for(proxy_id)
        if nack is None or meant is None or meant.version != nack.version:
            return 0.0
        hold = min(MAX_NACK_HOLD, 2.0 ** min(nack.count - 1, 16))
        return max(0.0, nack.at + hold - self.clock())

    async def wait_release(self, proxy_id: str | None, after: int, timeout: float) -> ReleaseRecord | None:
        """The release for this proxy once its version is above `after`; None after `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            release = self.release_for(proxy_id)
            if release is not None and release.version > after:
                return release
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await self._changed.wait(remaining)

    def state_of(self, entry: ProxyEntry) -> ProxyState:
        """synced / pending / failed / stale, as `/v1/status` shows the proxy."""
        if entry.stale:
            return "stale"
        meant = self.release_for(entry.id)
        if meant is None:
            return "pending"
        if entry.bundle == meant.bundle and (entry.release_version or 0) >= meant.version:
            return "synced"
        if entry.error is not None and entry.nacked_version in (None, meant.version):
            return "failed"
        return "pending"

    def lag(self, entry: ProxyEntry, issued: Sequence[int]) -> tuple[int | None, int | None]:
        """(the release version meant for this proxy, `releases_behind` it); `issued` is
        `issued_versions()`, read once for all proxies."""
        meant = self.release_for(entry.id)
        desired = None if meant is None else meant.version
        return desired, releases_behind(entry.release_version, desired, issued)

    def issued_versions(self) -> list[int]:
        """The release versions the ledger holds, ascending; read again only after a newer one."""
        current = self.ledger.current()
        newest = None if current is None else current.version
        if newest != self._issued[0]:
            self._issued = (newest, [record.version for record in self.ledger.releases()])
        return self._issued[1]

    def progress(self) -> RolloutProgress:
        """The phase, and how many proxies the release is meant for now and run it (the
        metrics' gauges): the canaries while they run, every live proxy once promoted,
        none once halted (the fallback release is the stable one's, for everyone)."""
        with self._lock:
            s = self._s
            if s is None:
                return RolloutProgress()
            if s.phase in ("canary", "baking"):
                targeted = list(s.canary)
            else:
                targeted = [] if s.phase == "halted" else self.registry.live_ids()
            return RolloutProgress(s.phase, len(targeted), sum(1 for p in targeted if self._has_acked(p)))

    def to_json(self) -> dict[str, object]:
        """The rollout as `/v1/status` shows it."""
        with self._lock:
            s, stable = self._s, self._stable
            stable_json = None if stable is None else {"version": stable.version, "bundle": stable.bundle}
            halted = None
            if s is not None and s.phase == "halted":
                halted = {"reason": s.halted_reason, "rolled_back_to": stable_json}
            acked = [] if s is None else [p for p in {*s.acked, *self.registry.live_ids()} if self._has_acked(p)]
            return {
                "version": None if s is None else s.version,
                "bundle": None if self._release is None else self._release.bundle,
                "phase": None if s is None else s.phase,
                "stable": stable_json,
                "canary": [] if s is None else list(s.canary),
                "acked": sorted(acked),
                "failures": [] if s is None else [{"proxy": p, "reason": r} for p, r in s.failures.items()],
                "bake_until": None if s is None or s.bake_until is None else _iso(s.bake_until),
                "halted": halted,
                "policy": None if s is None else msgspec.to_builtins(s.policy),
            }

    # -- the state machine -------------------------------------------------------------------

    def _advance(self) -> None:
        """Take every transition that is due now; persist and wake waiters when the phase moves."""
        s, release, stable = self._s, self._release, self._stable
        if s is None or release is None or not self.writable:
            return
        before, canaries = s.phase, len(s.canary)
        halts = release.reason == "commit" and len(s.failures) > s.policy.max_failures
        if s.phase in ("canary", "baking", "promoted") and halts and stable is not None:
            self._halt(s, stable)
        if s.phase == "canary":
            if not s.canary:
                s.canary = self._pick_canaries([])
            if s.canary and all(self._done(p) for p in s.canary):
                s.phase, s.bake_until = "baking", self.clock() + s.policy.bake_seconds
        if s.phase == "baking" and s.bake_until is not None and self.clock() >= s.bake_until:
            s.phase = "promoted"
        if s.phase == "promoted":
            live = self.registry.live_ids()
            self._targets.update(live)
            if all(self._done(p) for p in live):
                s.phase, self._stable, self._targets = "complete", release, set()
                s.stable = release.version
        if s.phase != before:
            log.info("rollout of release %d: %s -> %s", release.version, before, s.phase)
        if s.phase != before or len(s.canary) != canaries:
            self._save()

    def _halt(self, s: RolloutState, stable: ReleaseRecord) -> None:
        try:
            halt = self.issuer.issue(stable.bundle, commit=stable.commit, reason="halt")
        except ReconcilerError as exc:  # tried again on the next tick or report
            log.error("rollout of release %d should halt but cannot issue the roll-back: %s", s.version, exc)
            return
        failures = "; ".join(f"{p}: {r}" for p, r in s.failures.items())
        why = f"{len(s.failures)} failure(s), more than max_failures {s.policy.max_failures}: {failures}"
        s.phase, s.halted_reason, s.stable = "halted", why[:_MAX_REASON], halt.version
        self._stable, self._targets = halt, set()
        log.error("rollout of release %d halted, release %d rolls back to %s: %s", s.version, halt.version,
                  halt.bundle, s.halted_reason)  # fmt: skip

    def _fail(self, proxy_id: str, reason: str) -> None:
        s = self._s
        if s is not None and self.writable and proxy_id not in s.failures and s.phase in ("canary", "baking", "promoted"):
            s.failures[proxy_id] = reason[:_MAX_REASON]
            self._save()

    def _targeted(self, proxy_id: str) -> bool:
        s = self._s
        if s is None:
            return False
        return proxy_id in s.canary if s.phase in ("canary", "baking") else s.phase == "promoted"

    def _done(self, proxy_id: str) -> bool:
        return self._s is not None and (proxy_id in self._s.failures or self._has_acked(proxy_id))

    def _has_acked(self, proxy_id: str, entry: ProxyEntry | None = None) -> bool:
        s, release = self._s, self._release
        if s is None or release is None:
            return False
        if proxy_id in s.acked:
            return True
        entry = entry if entry is not None else self.registry.get(proxy_id)
        return entry is not None and entry.bundle == release.bundle and (entry.release_version or 0) >= release.version

    def _pick_canaries(self, keep: list[str]) -> list[str]:
        s, live = self._s, self.registry.live_ids()
        percent = s.policy.canary_percent if s is not None else 0
        version = s.version if s is not None else 0
        want = max(1, math.ceil(percent * len(live) / 100)) if live else 0
        order = sorted((p for p in live if p not in keep), key=lambda p: _rank(version, p))
        return keep + order[: max(0, want - len(keep))]

    def _is_live(self, proxy_id: str) -> bool:
        entry = self.registry.get(proxy_id)
        return entry is not None and not entry.stale

    def _known(self) -> int:
        """The newest version this rollout has served (its own, or a halt's), 0 for none."""
        s = self._s
        return 0 if s is None else max(s.version, s.stable or 0)

    def _stable_version(self) -> int | None:
        return None if self._stable is None else self._stable.version

    # -- persistence ---------------------------------------------------------------------------

    def _save(self) -> None:
        if self._s is not None and self.writable:
            save_rollout(self.ledger, self._s)
            self._changed.notify()


def releases_behind(applied: int | None, desired: int | None, issued: Sequence[int]) -> int | None:
    """How many releases were issued after `applied` (the version a proxy runs) up to and
    including `desired` (the one meant for it): 0 when it runs that one or a newer one,
    None when it runs none or none is meant for it. `issued` lists the versions the
    ledger holds, ascending; versions older than that history (pruned) count one each."""
    if applied is None or desired is None:
        return None
    if applied >= desired:
        return 0
    oldest = issued[0] if issued else desired + 1
    pruned = max(0, min(oldest, desired + 1) - applied - 1)
    return pruned + sum(1 for version in issued if applied < version <= desired)


def _rank(version: int, proxy_id: str) -> bytes:
    return hashlib.sha256(f"{version}:{proxy_id}".encode()).digest()


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
