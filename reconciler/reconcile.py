"""The reconcile loop: follow the branch, compile each new commit, release what changed.

One pass (`Reconciler.reconcile`) is a fixed order of small idempotent steps, each
either handing the next one its input or ending the pass with a typed result (the shape
of Flux's source controller):

    read tip ─────────── SourceUnavailable ───────────────► source-unavailable (retried)
      │ tip is the last reconciled commit, a release exists ─► unchanged-commit
      ▼
    phase "compiling <sha>"         (status is written before the slow stage)
    compile the commit (a thread) ─ errors, failing golden ─► rejected: last_compile.ok
      │                             requests, unreadable       false with diagnostics;
      ▼                                                        the release stays
    store the bundle by digest; last_compile ok
      │ digest is the current release's bundle ────────────► unchanged-digest (no release)
      ▼
    Issuer.issue(digest, commit, "commit") → Rollout.start ─► released
    record the commit as reconciled (last: a crash before it means the next pass redoes
    the steps, and every one of them is idempotent)

The loop (`Reconciler.run`) makes a first pass at once, then one pass per wake-up
(`poke()`, called by the repo watcher). Wake-ups that arrive during a pass make exactly
one more pass, which reads the newest tip: rapid commits coalesce to the newest. Every
`tick_interval` it sweeps the proxy registry, advances the rollout and re-issues the
current release at half life. A pass that fails is retried with exponential backoff
(cap 60 s; a wake-up cuts the wait short when the source was the problem); nothing
ends the loop but `stop`.

Each compile is timed and counted by its result (`Metrics.compiled`: ok, rejected, or
source-unavailable, which also counts a pass that could not read the branch).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starmesh.compiler.compile import CompileResult, compile_commit
from starmesh.compiler.errors import SourceError
from starmesh.reconciler.diagnostics import MAX_DIAGNOSTICS, Diagnostic, capped, headline, unreadable
from starmesh.reconciler.errors import SourceUnavailable
from starmesh.reconciler.issuer import Issuer
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import NO_METRICS, CompileOutcome, Metrics
from starmesh.reconciler.model import CompileStatus, ReleaseRecord, utc_now
from starmesh.reconciler.registry import Registry
from starmesh.reconciler.rollout import Rollout
from starmesh.reconciler.rollout_state import RolloutPolicy
from starmesh.reconciler.source import RepoSource
from starmesh.reconciler.watch import backoff_delay

__all__ = ["MAX_DIAGNOSTICS", "Outcome", "ReconcileResult", "Reconciler"]  # MAX_DIAGNOSTICS: from diagnostics.py

Outcome = Literal["released", "unchanged-commit", "unchanged-digest", "rejected", "source-unavailable"]

MAX_BACKOFF = 60.0
"""The longest wait before retrying a failed pass."""

log = logging.getLogger("starmesh.control_plane.reconcile")


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass did: its outcome, the commit it looked at, and what came of it."""

    outcome: Outcome
    commit: str | None
    detail: str
    digest: str | None = None
    release: ReleaseRecord | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "commit": self.commit,
            "detail": self.detail,
            "bundle": self.digest,
            "release_version": self.release.version if self.release is not None else None,
        }


class Reconciler:
    """Turns the branch's commits into releases; `reconcile()` is one pass, `run()` the loop."""

    def __init__(
        self,
        source: RepoSource,
        ledger: Ledger,
        issuer: Issuer,
        rollout: Rollout,
        *,
        registry: Registry | None = None,
        subdir: str = "",
        entry: str = "mesh.star",
        on_status: Callable[[str], None] | None = None,
        on_result: Callable[[ReconcileResult], None] | None = None,
        tick_interval: float = 1.0,
        max_backoff: float = MAX_BACKOFF,
        rng: random.Random | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.source = source
        self.ledger = ledger
        self.issuer = issuer
        self.rollout = rollout
        self.registry = registry
        self.subdir = subdir
        self.entry = entry
        self.on_status = on_status
        self.on_result = on_result
        self.tick_interval = tick_interval
        self.max_backoff = max_backoff
        self.metrics = metrics
        self.phase = "starting"
        self.last_result: ReconcileResult | None = None
        self.wake = asyncio.Event()
        self._rejected: str | None = None  # the commit this process compiled and rejected
        self._rng = rng or random.Random()
        self._complaints: dict[str, str] = {}

    def poke(self) -> None:
        """The branch may have moved: make a pass soon (call on the event loop)."""
        self.wake.set()

    def to_json(self) -> dict[str, object]:
        """What `/v1/status` shows of the loop."""
        return {
            "repo": self.source.repo,
            "branch": self.source.branch,
            "phase": self.phase,
            "last_result": self.last_result.to_json() if self.last_result is not None else None,
        }

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        if self.on_status is not None:
            self.on_status(phase)

    # -- one pass --------------------------------------------------------------------

    async def reconcile(self) -> ReconcileResult:
        """One pass over the steps above; returns what it did."""
        result = await self._reconcile()
        self.last_result = result
        self._set_phase("idle" if result.outcome != "source-unavailable" else f"waiting: {result.detail}")
        if self.on_result is not None:
            self.on_result(result)
        return result

    async def _reconcile(self) -> ReconcileResult:
        self._set_phase(f"reading {self.source.branch}")
        try:
            tip = await asyncio.to_thread(self.source.tip)
        except SourceUnavailable as exc:
            self.metrics.compiled("source-unavailable", None)
            return ReconcileResult("source-unavailable", None, str(exc))
        unchanged = self._unchanged(tip)
        if unchanged is not None:
            return unchanged
        self._set_phase(f"compiling {tip[:12]}")
        started = time.perf_counter()
        compiled = await self._compile(tip)
        self.metrics.compiled(_outcome(compiled), time.perf_counter() - started)
        if isinstance(compiled, ReconcileResult):
            return compiled
        return await self._release(tip, compiled)

    def _unchanged(self, tip: str) -> ReconcileResult | None:
        """Step: nothing to do when the tip was reconciled already."""
        if tip != self.ledger.last_commit():
            return None
        current = self.ledger.current()
        if current is not None:
            return ReconcileResult("unchanged-commit", tip, f"{tip[:12]} is reconciled", current.bundle, current)
        if tip == self._rejected:
            return ReconcileResult("unchanged-commit", tip, f"{tip[:12]} was rejected; waiting for a new commit")
        return None  # a restart retries a rejected commit once (the compiler may be newer)

    async def _compile(self, tip: str) -> CompileResult | ReconcileResult:
        """Step: compile the commit; a rejected commit ends the pass here."""
        path = self.source.repo_path()
        try:
            result = await asyncio.to_thread(
                functools.partial(compile_commit, path, tip, subdir=self.subdir, entry=self.entry)
            )
        except SourceError as exc:
            try:  # the repository itself vanished or moved: not the commit's fault
                still = await asyncio.to_thread(self.source.read_tip)
            except SourceUnavailable as gone:
                return ReconcileResult("source-unavailable", tip, str(gone))
            if still != tip:
                return ReconcileResult("source-unavailable", tip, f"the branch moved while reading {tip[:12]}")
            return self._reject(tip, [unreadable(str(exc), entry=self.entry, subdir=self.subdir)])
        if not result.ok or result.data is None or result.digest is None:
            return self._reject(tip, [finding.to_json() for finding in result.findings])
        return result

    def _reject(self, tip: str, diagnostics: list[Diagnostic]) -> ReconcileResult:
        errors = [d for d in diagnostics if d.get("severity") == "error"]
        kept = capped(diagnostics, entry=self.entry, commit=tip)
        self.ledger.set_last_compile(CompileStatus(tip, False, None, utc_now(), tuple(kept)))
        self.ledger.set_last_commit(tip)
        self._rejected = tip
        where = headline(errors[0] if errors else {})
        log.warning("commit %s rejected (%d errors; the release stays); first: %s", tip[:12], len(errors), where)
        return ReconcileResult("rejected", tip, f"{len(errors)} errors, first {where}")

    async def _release(self, tip: str, compiled: CompileResult) -> ReconcileResult:
        """Steps: store the bundle; stop when its digest is released already; else issue and roll out."""
        assert compiled.data is not None
        data = compiled.data
        digest = await asyncio.to_thread(self.ledger.put_bundle, data)
        warnings = tuple(finding.to_json() for finding in compiled.findings[:MAX_DIAGNOSTICS])
        self.ledger.set_last_compile(CompileStatus(tip, True, digest, utc_now(), warnings))
        current = self.ledger.current()
        if current is not None and current.bundle == digest:
            self.ledger.set_last_commit(tip)
            log.info("commit %s compiles to %s, which release %d has: nothing to do", tip[:12], digest, current.version)
            return ReconcileResult("unchanged-digest", tip, f"bundle {digest} is released already", digest, current)
        record = self.issuer.issue(digest, commit=tip, reason="commit")
        self.rollout.start(record, RolloutPolicy.from_bundle(data))
        self.ledger.set_last_commit(tip)
        log.info("released version %d: %s (commit %s)", record.version, digest, tip[:12])
        return ReconcileResult("released", tip, f"release {record.version}", digest, record)

    # -- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Pass at start, then on wake-ups; tick every tick_interval; until `stop` is set."""
        loop = asyncio.get_running_loop()
        failures = 0
        due = True
        retry_at = 0.0
        wake_cuts_wait = True
        next_tick = loop.time()
        while not stop.is_set():
            if self.wake.is_set():  # commits during the last pass or wait: one more pass
                self.wake.clear()
                due = True
                if wake_cuts_wait:
                    retry_at = 0.0
            if due and loop.time() >= retry_at:
                due = False
                failure, wake_cuts_wait = await self._guarded_pass()
                if failure is not None:
                    failures += 1
                    delay = backoff_delay(failures - 1, 1.0, self.max_backoff, self._rng)
                    retry_at, due = loop.time() + delay, True
                    self._set_phase(f"retrying in {delay:.1f}s: {failure}")
                else:
                    failures = 0
            if loop.time() >= next_tick:
                self.tick()
                next_tick = loop.time() + self.tick_interval
            until = min(next_tick, retry_at) if due else next_tick
            await _wait_any(stop, self.wake, max(0.0, until - loop.time()))

    async def _guarded_pass(self) -> tuple[str | None, bool]:
        """(why the pass failed or None, whether a wake-up may cut the retry wait short)."""
        try:
            result = await self.reconcile()
        except Exception as exc:  # a failed step must not end the loop
            log.exception("reconcile pass failed")
            return f"{type(exc).__name__}: {exc}", False
        if result.outcome == "source-unavailable":
            self._complain("source", result.detail)
            return result.detail, True
        self._complaints.pop("source", None)
        return None, True

    def tick(self) -> None:
        """Periodic work: stale proxies, rollout progress, the half-life re-issue."""
        steps: tuple[tuple[str, Callable[[], object]], ...] = (
            ("registry", self.registry.sweep if self.registry is not None else _nothing),
            ("rollout", self.rollout.tick),
            ("reissue", self._reissue_if_due),
        )
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                self._complain(name, f"{type(exc).__name__}: {exc}", error=True)
            else:
                self._complaints.pop(name, None)

    def _reissue_if_due(self) -> None:
        """The release everyone runs, re-issued at half life (the rollout knows which and when)."""
        record = self.rollout.reissue()
        if record is not None:
            log.info("re-issued %s as version %d (the release before it was half-way to expiry)",
                     record.bundle, record.version)

    def _complain(self, what: str, message: str, *, error: bool = False) -> None:
        """Log a repeating failure once, not once a second."""
        if self._complaints.get(what) == message:
            return
        self._complaints[what] = message
        (log.error if error else log.warning)("%s: %s", what, message)


def _nothing() -> None:
    return None


def _outcome(compiled: CompileResult | ReconcileResult) -> CompileOutcome:
    """The compile step's result as the metrics label it."""
    if isinstance(compiled, CompileResult):
        return "ok"
    return "source-unavailable" if compiled.outcome == "source-unavailable" else "rejected"


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    """Return when `stop` or `wake` is set, or after `timeout` seconds."""
    if stop.is_set() or wake.is_set():
        return
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
