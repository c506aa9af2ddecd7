"""Noticing when the policy branch moves: `RepoWatcher` wakes the reconcile loop.

    RepoWatcher  calls `notify()` (on the event loop) whenever the branch may have moved:

        local repo ── watchdog on <git dir>/HEAD, packed-refs, refs/heads/** ──┐
                   └─ safety-net poll every poll_interval (default 10 s) ──────┼──► notify()
        URL ───────── fetch poll every poll_interval (default 15 s);  ─────────┘
                      failures back off exponentially with jitter (cap 300 s)

A wake-up is only a hint: the reconcile loop reads the tip itself and does nothing when
it has not changed, so spurious or repeated wake-ups cost one ref read. Only writes are
hints: watchdog also reports files being opened and read (every `tip()` reads the refs),
and taking those as hints would wake the loop forever.

Reading the branch (a local path read in place, a URL mirrored and fetched) is
source.py's `RepoSource`; it, `check_branch` and `is_remote` stay importable from here
for the callers written before that split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from starmesh.reconciler.errors import SourceUnavailable
from starmesh.reconciler.source import RepoSource, check_branch, is_remote

__all__ = [
    "LOCAL_POLL_INTERVAL",
    "MAX_POLL_BACKOFF",
    "REMOTE_POLL_INTERVAL",
    "RepoSource",  # re-exported from source.py
    "RepoWatcher",
    "backoff_delay",
    "check_branch",  # re-exported from source.py
    "is_remote",  # re-exported from source.py
]

LOCAL_POLL_INTERVAL = 10.0
"""Seconds between safety-net reads of a local repo's branch (watchdog does the real work)."""
REMOTE_POLL_INTERVAL = 15.0
"""Seconds between fetches of a remote repo."""
MAX_POLL_BACKOFF = 300.0
"""The longest wait between fetches while they keep failing."""

log = logging.getLogger("starmesh.control_plane.watch")

_WRITES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_DELETED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED})


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after `failures` failures in a row: base·2^failures, capped, with
    jitter (a random 50–100 % of it, so several control planes do not retry in step)."""
    return min(cap, base * 2.0 ** min(max(failures, 0), 32)) * rng.uniform(0.5, 1.0)


class _RefEvents(FileSystemEventHandler):
    """watchdog's callback (on its own thread): hand ref writes to the event loop."""

    def __init__(self, git_dir: Path, wake: Callable[[], None]) -> None:
        self.git_dir = git_dir
        self.heads = git_dir / "refs" / "heads"
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _WRITES:
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(self._relevant(os.fsdecode(p)) for p in paths if p):
            self.wake()

    def _relevant(self, path: str) -> bool:
        where = Path(path)
        if where.parent == self.git_dir:
            return where.name in ("HEAD", "packed-refs", "packed-refs.lock", "HEAD.lock")
        return where == self.heads or self.heads in where.parents


class RepoWatcher:
    """Calls `notify()` on the event loop whenever the branch may have moved.

    `start()` and `stop()` run on the loop; `notify` is always called on it."""

    def __init__(
        self,
        source: RepoSource,
        notify: Callable[[], None],
        *,
        poll_interval: float | None = None,
        max_backoff: float = MAX_POLL_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        default = REMOTE_POLL_INTERVAL if source.remote else LOCAL_POLL_INTERVAL
        self.source = source
        self.notify = notify
        self.poll_interval = poll_interval if poll_interval is not None else default
        self.max_backoff = max(max_backoff, self.poll_interval)
        self.failures = 0
        self.last_tip: str | None = None
        self.watching: Path | None = None  # the git dir watchdog watches (local repos)
        self._rng = rng or random.Random()
        self._observer: Any = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.source.remote:
            self._start_observer(loop)
        self._poller = loop.create_task(self._poll(), name="starmesh-repo-poll")

    def _start_observer(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            git_dir = self.source.git_dir()
        except SourceUnavailable as exc:
            log.warning("not watching %s (%s); polling every %ss", self.source.repo, exc, self.poll_interval)
            return

        def wake() -> None:  # on watchdog's thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to wake
                loop.call_soon_threadsafe(self.notify)

        handler = _RefEvents(git_dir, wake)
        observer = Observer()
        observer.daemon = True
        observer.schedule(handler, str(git_dir), recursive=False)
        if handler.heads.is_dir():
            observer.schedule(handler, str(handler.heads), recursive=True)
        try:
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit
            log.warning("cannot watch %s (%s); polling every %ss", git_dir, exc, self.poll_interval)
            return
        self._observer = observer
        self.watching = git_dir

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._next_delay())
            try:
                tip = await asyncio.to_thread(self.source.tip)
            except SourceUnavailable as exc:
                self.failures += 1
                log.warning("%s (attempt %d; next in up to %.0fs)", exc, self.failures, self._cap())
                continue
            except Exception:  # a bug must not end the polling
                self.failures += 1
                log.exception("reading %s failed", self.source)
                continue
            if self.failures:
                log.info("%s is readable again", self.source)
            self.failures = 0
            if tip != self.last_tip:
                self.last_tip = tip
                self.notify()

    def _cap(self) -> float:
        return min(self.max_backoff, self.poll_interval * 2.0 ** min(self.failures, 32))

    def _next_delay(self) -> float:
        if not self.failures:
            return self.poll_interval
        return backoff_delay(self.failures, self.poll_interval, self.max_backoff, self._rng)

    async def stop(self) -> None:
        """Stop polling and watching; safe to call twice."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
