"""RepoSource and RepoWatcher against real Git repositories in tmp_path.

    local repo (work tree / bare) ── read in place; watchdog on refs wakes the watcher
    file:// URL ── mirrored into state_dir/mirror.git, fetched on each read; polled

Waits poll for a condition with a generous deadline; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from starmesh.reconciler.errors import SourceUnavailable
from starmesh.reconciler.watch import RepoSource, RepoWatcher, backoff_delay, check_branch, is_remote

DEADLINE = 30.0


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def make_repo(path: Path, *, bare: bool = False) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main", *(["--bare"] if bare else []))
    git(path, "config", "user.name", "starmesh tests")
    git(path, "config", "user.email", "tests@starmesh.invalid")
    git(path, "config", "commit.gpgsign", "false")
    return path


def commit(repo: Path, name: str, text: str, *, branch: str = "main") -> str:
    if git(repo, "branch", "--show-current") != branch:
        exists = subprocess.run(["git", "-C", str(repo), "rev-parse", "-q", "--verify", branch], capture_output=True)
        git(repo, "checkout", "-q", *([branch] if exists.returncode == 0 else ["-b", branch]))
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"write {name}")
    return git(repo, "rev-parse", "HEAD")


async def until(test: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not test():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# -- names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "remote"),
    [
        ("file:///srv/policy.git", True),
        ("https://git.example/policy.git", True),
        ("ssh://git@git.example/policy.git", True),
        ("git@git.example:team/policy.git", True),
        ("/srv/policy", False),
        ("policy", False),
        ("./team:policy", False),
    ],
)
def test_urls_are_remote_and_paths_local(repo: str, remote: bool) -> None:
    assert is_remote(repo) is remote


def test_an_existing_path_with_a_colon_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "team:policy").mkdir()
    assert not is_remote("team:policy")


@pytest.mark.parametrize("branch", ["main", "release/v2", "feature-1.2"])
def test_valid_branch_names(branch: str) -> None:
    assert check_branch(branch) == branch


@pytest.mark.parametrize("branch", ["", "-x", "a..b", "a b", "x.lock", "refs/heads/main", "a~1", "a:b", "x/"])
def test_invalid_branch_names_say_so(branch: str) -> None:
    with pytest.raises(ValueError, match="not a valid branch name"):
        check_branch(branch)


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for failures, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (9, 300.0), (60, 300.0)]:
        for _ in range(50):
            delay = backoff_delay(failures, 1.0, 300.0, rng)
            assert ceiling * 0.5 <= delay <= ceiling
    draws = {backoff_delay(3, 1.0, 300.0, rng) for _ in range(20)}
    assert len(draws) > 1, "no jitter"


# -- RepoSource -----------------------------------------------------------------------


def test_local_work_tree_tip_and_git_dir(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "policy")
    first = commit(repo, "a.txt", "1")
    source = RepoSource(str(repo), "main", tmp_path / "state")
    assert not source.remote
    assert source.tip() == first
    assert source.repo_path() == repo
    assert source.git_dir() == (repo / ".git").resolve()
    second = commit(repo, "a.txt", "2")
    assert source.tip() == second
    assert not (tmp_path / "state").exists(), "a local repo needs no mirror"


def test_local_bare_repo_and_other_branches(tmp_path: Path) -> None:
    work = make_repo(tmp_path / "work")
    main_sha = commit(work, "a.txt", "1")
    release_sha = commit(work, "b.txt", "2", branch="release/v2")
    bare = tmp_path / "policy.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    assert RepoSource(str(bare), "main", tmp_path / "state").tip() == main_sha
    source = RepoSource(str(bare), "release/v2", tmp_path / "state")
    assert source.tip() == release_sha
    assert source.git_dir() == bare.resolve()


def test_missing_branch_and_missing_repo_are_unavailable(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "policy")
    with pytest.raises(SourceUnavailable, match="no branch 'main'"):
        RepoSource(str(repo), "main", tmp_path / "state").tip()  # nothing committed yet
    commit(repo, "a.txt", "1")
    with pytest.raises(SourceUnavailable, match="no branch 'prod'.*--branch"):
        RepoSource(str(repo), "prod", tmp_path / "state").tip()
    with pytest.raises(SourceUnavailable, match="is not a Git repository"):
        RepoSource(str(tmp_path / "nowhere"), "main", tmp_path / "state").tip()


def test_a_url_is_mirrored_into_the_state_dir_and_fetched_on_each_read(tmp_path: Path) -> None:
    origin = make_repo(tmp_path / "origin")
    first = commit(origin, "a.txt", "1")
    state = tmp_path / "state"
    source = RepoSource(origin.as_uri(), "main", state)
    assert source.remote
    assert source.tip() == first
    assert source.repo_path() == state / "mirror.git"
    assert git(state / "mirror.git", "rev-parse", "--is-bare-repository") == "true"
    second = commit(origin, "a.txt", "2")
    assert source.read_tip() == first, "read_tip does not fetch"
    assert source.tip() == second
    # A restarted control plane reuses the mirror (and fetch --prune drops deleted branches).
    commit(origin, "b.txt", "x", branch="gone")
    again = RepoSource(origin.as_uri(), "gone", state)
    assert again.tip() == git(origin, "rev-parse", "gone")
    git(origin, "checkout", "-q", "main")
    git(origin, "branch", "-q", "-D", "gone")
    with pytest.raises(SourceUnavailable, match="no branch 'gone'"):
        again.tip()


def test_a_changed_url_is_followed(tmp_path: Path) -> None:
    old = make_repo(tmp_path / "old")
    commit(old, "a.txt", "old")
    new = make_repo(tmp_path / "new")
    new_tip = commit(new, "a.txt", "new")
    RepoSource(old.as_uri(), "main", tmp_path / "state").tip()
    assert RepoSource(new.as_uri(), "main", tmp_path / "state").tip() == new_tip


def test_an_unreachable_url_says_what_failed(tmp_path: Path) -> None:
    source = RepoSource((tmp_path / "missing.git").as_uri(), "main", tmp_path / "state")
    with pytest.raises(SourceUnavailable, match="git clone.*failed: .*does not appear to be a git repository"):
        source.tip()
    assert not (tmp_path / "state" / "mirror.git").exists(), "a failed clone leaves no mirror"


def test_a_fetch_is_refused_once_closed(tmp_path: Path) -> None:
    origin = make_repo(tmp_path / "origin")
    commit(origin, "a.txt", "1")
    source = RepoSource(origin.as_uri(), "main", tmp_path / "state")
    source.close()
    with pytest.raises(SourceUnavailable, match="stopping"):
        source.tip()


# -- RepoWatcher ----------------------------------------------------------------------


def test_watchdog_wakes_on_a_local_commit_and_not_on_reads(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "policy")
    commit(repo, "a.txt", "1")
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
            await asyncio.to_thread(commit, repo, "a.txt", "2")
            await until(lambda: bool(wakes), "a wake-up after the commit")
            count = len(wakes)
            await asyncio.to_thread(commit, repo, "b.txt", "3", branch="feature/new")  # a new refs/heads subfolder
            await until(lambda: len(wakes) > count, "a wake-up for a new branch folder")
        finally:
            await watcher.stop()
            await watcher.stop()  # twice is fine

    run(main)


def test_the_safety_net_poll_notices_a_local_commit(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "policy")
    commit(repo, "a.txt", "1")
    source = RepoSource(str(repo), "main", tmp_path / "state")
    wakes: list[str | None] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: wakes.append(watcher.last_tip), poll_interval=0.05)
        watcher._start_observer = lambda loop: None  # type: ignore[method-assign]  # polling only
        await watcher.start()
        try:
            await until(lambda: len(wakes) == 1, "the first poll")
            second = await asyncio.to_thread(commit, repo, "a.txt", "2")
            await until(lambda: second in wakes, "the poll to see the new tip")
            assert watcher.watching is None
        finally:
            await watcher.stop()

    run(main)


def test_a_remote_is_polled_and_a_new_commit_wakes(tmp_path: Path) -> None:
    origin = make_repo(tmp_path / "origin")
    first = commit(origin, "a.txt", "1")
    source = RepoSource(origin.as_uri(), "main", tmp_path / "state")
    seen: list[str | None] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: seen.append(watcher.last_tip), poll_interval=0.1)
        await watcher.start()
        try:
            await until(lambda: seen == [first], "the first fetch")
            second = await asyncio.to_thread(commit, origin, "a.txt", "2")
            await until(lambda: seen == [first, second], "the fetch of the new commit")
        finally:
            await watcher.stop()

    run(main)


def test_a_failing_remote_backs_off_then_recovers(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    source = RepoSource(origin.as_uri(), "main", tmp_path / "state")
    seen: list[str | None] = []

    async def main() -> None:
        watcher = RepoWatcher(source, lambda: seen.append(watcher.last_tip), poll_interval=0.02, max_backoff=0.2)
        await watcher.start()
        try:
            await until(lambda: watcher.failures >= 3, "three failed fetches")
            assert seen == []
            assert 0.02 < watcher._next_delay() <= 0.2
            make_repo(origin)
            tip = await asyncio.to_thread(commit, origin, "a.txt", "1")
            await until(lambda: seen == [tip], "the fetch after the repo appeared")
            assert watcher.failures == 0
        finally:
            await watcher.stop()

    run(main)
