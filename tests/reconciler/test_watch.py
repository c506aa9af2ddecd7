"""RepoWatcher against real Git repositories in tmp_path.

    local repo ── watchdog on refs wakes the watcher (a slow poll as a safety net)
    file:// URL ── fetched and polled; failures back off

Waits poll for a condition with a generous deadline; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from starmesh.reconciler.source import RepoSource
from starmesh.reconciler.watch import RepoWatcher, backoff_delay


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for failures, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (9, 300.0), (60, 300.0)]:
        for _ in range(50):
            delay = backoff_delay(failures, 1.0, 300.0, rng)
            assert ceiling * 0.5 <= delay <= ceiling
    draws = {backoff_delay(3, 1.0, 300.0, rng) for _ in range(20)}
    assert len(draws) > 1, "no jitter"


# -- RepoWatcher ----------------------------------------------------------------------


def test_watchdog_wakes_on_a_local_commit_and_not_on_reads(tmp_path: Path, h: Any) -> None:
    repo = h.make_repo(tmp_path / "policy")
    h.commit(repo, {"a.txt": "1"})
    source = RepoSource(str(repo), "main", tmp_path / "state")
    wakes: list[int] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: wakes.append(1), poll_interval=3600)  # no poll in this test
        await watcher.start()
        try:
            assert watcher.watching == (repo / ".git").resolve()
            for _ in range(5):
                await asyncio.to_thread(source.tip)  # reading refs is no hint
            await asyncio.sleep(0.5)
            assert wakes == []
            await asyncio.to_thread(h.commit, repo, {"a.txt": "2"})
            await h.until(lambda: bool(wakes), "a wake-up after the commit")
            count = len(wakes)
            await asyncio.to_thread(h.commit, repo, {"b.txt": "3"}, branch="feature/new")  # a new refs/heads subfolder
            await h.until(lambda: len(wakes) > count, "a wake-up for a new branch folder")
        finally:
            await watcher.stop()
            await watcher.stop()  # twice is fine

    h.run(main)


def test_the_safety_net_poll_notices_a_local_commit(tmp_path: Path, h: Any) -> None:
    repo = h.make_repo(tmp_path / "policy")
    h.commit(repo, {"a.txt": "1"})
    source = RepoSource(str(repo), "main", tmp_path / "state")
    wakes: list[str | None] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: wakes.append(watcher.last_tip), poll_interval=0.05)
        watcher._start_observer = lambda loop: None  # type: ignore[method-assign]  # polling only
        await watcher.start()
        try:
            await h.until(lambda: len(wakes) == 1, "the first poll")
            second = await asyncio.to_thread(h.commit, repo, {"a.txt": "2"})
            await h.until(lambda: second in wakes, "the poll to see the new tip")
            assert watcher.watching is None
        finally:
            await watcher.stop()

    h.run(main)


def test_a_remote_is_polled_and_a_new_commit_wakes(tmp_path: Path, h: Any) -> None:
    origin = h.make_repo(tmp_path / "origin")
    first = h.commit(origin, {"a.txt": "1"})
    source = RepoSource(origin.as_uri(), "main", tmp_path / "state")
    seen: list[str | None] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: seen.append(watcher.last_tip), poll_interval=0.1)
        await watcher.start()
        try:
            await h.until(lambda: seen == [first], "the first fetch")
            second = await asyncio.to_thread(h.commit, origin, {"a.txt": "2"})
            await h.until(lambda: seen == [first, second], "the fetch of the new commit")
        finally:
            await watcher.stop()

    h.run(main)


def test_a_failing_remote_backs_off_then_recovers(tmp_path: Path, h: Any) -> None:
    origin = tmp_path / "origin"
    source = RepoSource(origin.as_uri(), "main", tmp_path / "state")
    seen: list[str | None] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: seen.append(watcher.last_tip), poll_interval=0.02, max_backoff=0.2)
        await watcher.start()
        try:
            await h.until(lambda: watcher.failures >= 3, "three failed fetches")
            assert seen == []
            assert 0.02 < watcher._next_delay() <= 0.2
            h.make_repo(origin)
            tip = await asyncio.to_thread(h.commit, origin, {"a.txt": "1"})
            await h.until(lambda: seen == [tip], "the fetch after the repo appeared")
            assert watcher.failures == 0
        finally:
            await watcher.stop()

    h.run(main)
