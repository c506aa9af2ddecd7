"""Where the policy comes from, and noticing when its branch moves.

    RepoSource   --repo PATH_OR_URL --branch B: `tip()` is the branch's commit sha now
                 local path (work tree or bare)   read in place; `repo_path()` is the path
                 URL (file://, http(s)://, ssh://, git@host:path)
                                                  `git clone --mirror` into
                                                  <state-dir>/mirror.git once, then
                                                  `git fetch --prune` before each read
    RepoWatcher  calls `notify()` (on the event loop) whenever the branch may have moved:

        local repo ── watchdog on <git dir>/HEAD, packed-refs, refs/heads/** ──┐
                   └─ safety-net poll every poll_interval (default 10 s) ──────┼──► notify()
        URL ───────── fetch poll every poll_interval (default 15 s);  ─────────┘
                      failures back off exponentially with jitter (cap 300 s)

A wake-up is only a hint: the reconcile loop reads the tip itself and does nothing when
it has not changed, so spurious or repeated wake-ups cost one ref read. Only writes are
hints: watchdog also reports files being opened and read (every `tip()` reads the refs),
and taking those as hints would wake the loop forever.

Git runs as a subprocess with a timeout, no terminal prompts (`GIT_TERMINAL_PROMPT=0`,
ssh in batch mode) and in its own process group, so a hung fetch is killed whole, and
`RepoSource.close()` ends one in flight when the control plane stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import threading
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

__all__ = [
    "LOCAL_POLL_INTERVAL",
    "MAX_POLL_BACKOFF",
    "REMOTE_POLL_INTERVAL",
    "RepoSource",
    "RepoWatcher",
    "backoff_delay",
    "check_branch",
    "is_remote",
]

LOCAL_POLL_INTERVAL = 10.0
"""Seconds between safety-net reads of a local repo's branch (watchdog does the real work)."""
REMOTE_POLL_INTERVAL = 15.0
"""Seconds between fetches of a remote repo."""
MAX_POLL_BACKOFF = 300.0
"""The longest wait between fetches while they keep failing."""
GIT_TIMEOUT = 120.0
"""Seconds one `git clone`/`git fetch` may take before it is killed."""

log = logging.getLogger("starmesh.control_plane.watch")

_URL_SCHEMES = ("file", "http", "https", "ssh", "git")
_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._~-]+@)?[A-Za-z0-9.-]+:(?!//)")
_WRITES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_DELETED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED})
_MESSAGE_LIMIT = 600  # characters of git's stderr kept in an error message


def is_remote(repo: str) -> bool:
    """True for a URL (`scheme://…`, scp-like `user@host:path`), False for a local path."""
    if "://" in repo:
        return True
    return bool(_SCP_LIKE.match(repo)) and not Path(repo).exists()


def check_branch(branch: str) -> str:
    """`branch` if it is a usable branch name; ValueError saying why otherwise."""
    bad = (
        not branch
        or branch.startswith(("-", "/", "refs/"))
        or branch.endswith(("/", ".", ".lock"))
        or ".." in branch
        or "//" in branch
        or "@{" in branch
        or any(c.isspace() or c in "~^:?*[\\" or ord(c) < 32 or ord(c) == 127 for c in branch)
    )
    if bad:
        raise ValueError(f"{branch!r} is not a valid branch name (e.g. main, release/v2)")
    return branch


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after `failures` failures in a row: base·2^failures, capped, with
    jitter (a random 50–100 % of it, so several control planes do not retry in step)."""
    return min(cap, base * 2.0 ** min(max(failures, 0), 32)) * rng.uniform(0.5, 1.0)


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GCM_INTERACTIVE"] = "never"
    env["LC_ALL"] = "C"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


class RepoSource:
    """The policy repository and branch the control plane follows.

    `tip()` blocks (it may fetch): call it from a thread. Every failure to read the
    branch is SourceUnavailable, whose message names the repository, the branch and
    what to check."""

    def __init__(self, repo: str, branch: str, state_dir: Path, *, git_timeout: float = GIT_TIMEOUT) -> None:
        self.repo = repo
        self.branch = check_branch(branch)
        self.remote = is_remote(repo)
        self.mirror = state_dir / "mirror.git"
        self.git_timeout = git_timeout
        self._lock = threading.Lock()  # one clone/fetch at a time (watcher and loop both call tip)
        self._running: subprocess.Popen[bytes] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RepoSource({self.repo!r}, branch={self.branch!r})"

    def repo_path(self) -> Path:
        """The repository `compile_commit` reads: the local path, or the mirror of a URL."""
        return self.mirror if self.remote else Path(self.repo)

    def git_dir(self) -> Path:
        """The directory holding the refs (`.git` of a work tree, the repo itself when bare)."""
        import git  # gitpython: imported by the reconciler only

        path = self.repo_path()
        try:
            with git.Repo(str(path)) as repository:
                return Path(repository.common_dir).resolve()
        except (git.exc.InvalidGitRepositoryError, git.exc.NoSuchPathError) as exc:
            what = "the mirror of " + self.repo if self.remote else self.repo
            raise SourceUnavailable(f"{path} ({what}) is not a Git repository") from exc

    def tip(self) -> str:
        """The branch's commit sha now (a URL is fetched first). SourceUnavailable on failure."""
        if self.remote:
            self.fetch()
        return self.read_tip()

    def read_tip(self) -> str:
        """The branch's commit sha as the repository (or mirror) holds it, without fetching."""
        import git

        path = self.repo_path()
        try:
            repository = git.Repo(str(path))
        except (git.exc.InvalidGitRepositoryError, git.exc.NoSuchPathError) as exc:
            raise SourceUnavailable(f"--repo {self.repo}: {path} is not a Git repository") from exc
        with repository:
            try:
                return str(repository.commit(f"refs/heads/{self.branch}").hexsha)
            except (git.exc.BadName, git.exc.BadObject, ValueError) as exc:
                raise SourceUnavailable(
                    f"--repo {self.repo}: no branch {self.branch!r} "
                    "(commit to it or push it, or pass --branch with an existing branch)"
                ) from exc

    def fetch(self) -> None:
        """Bring the mirror up to date: clone it on first use, then `git fetch --prune`."""
        if not self.remote:
            return
        with self._lock:
            if not (self.mirror / "HEAD").exists():
                self._clone()
                return
            url = self._run(["git", "config", "--get", "remote.origin.url"], cwd=self.mirror, check=False).strip()
            if url != self.repo:  # --repo changed between runs: follow the new URL
                log.info("mirror %s followed %s; switching it to %s", self.mirror, url or "?", self.repo)
                self._run(["git", "remote", "set-url", "origin", self.repo], cwd=self.mirror)
            self._run(["git", "fetch", "--prune", "--quiet", "origin"], cwd=self.mirror)

    def _clone(self) -> None:
        partial = self.mirror.with_name(self.mirror.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self.mirror.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceUnavailable(f"cannot create {self.mirror.parent}: {exc.strerror or exc}") from exc
        self._run(["git", "clone", "--mirror", "--quiet", "--", self.repo, str(partial)], cwd=self.mirror.parent)
        shutil.rmtree(self.mirror, ignore_errors=True)
        partial.rename(self.mirror)
        log.info("mirrored %s into %s", self.repo, self.mirror)

    def _run(self, args: list[str], *, cwd: Path, check: bool = True) -> str:
        """Run git in its own process group with a timeout; its stdout, or SourceUnavailable."""
        if self._closed:
            raise SourceUnavailable("the control plane is stopping")
        try:
            process = subprocess.Popen(
                args,
                cwd=cwd,
                env=_git_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise SourceUnavailable(f"cannot run git for {self.repo}: {exc.strerror or exc}") from exc
        self._running = process
        try:
            out, err = process.communicate(timeout=self.git_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            raise SourceUnavailable(
                f"`{' '.join(args[:2])}` of {self.repo} took over {self.git_timeout:.0f}s and was stopped "
                "(check the network and the URL)"
            ) from None
        finally:
            self._running = None
        if check and process.returncode != 0:
            if self._closed:
                raise SourceUnavailable("the control plane is stopping")
            lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
            detail = "; ".join(lines)[-_MESSAGE_LIMIT:] or f"exit status {process.returncode}"
            raise SourceUnavailable(f"`{' '.join(args[:2])}` of {self.repo} failed: {detail}")
        return out.decode("utf-8", "replace")

    def close(self) -> None:
        """Stop: kill a git command in flight and refuse new ones."""
        self._closed = True
        running = self._running
        if running is not None:
            _kill_group(running)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


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
