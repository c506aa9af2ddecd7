"""Where the policy comes from: the repository and branch the control plane follows.

    RepoSource   --repo PATH_OR_URL --branch B: `tip()` is the branch's commit sha now
                 local path (work tree or bare)   read in place; `repo_path()` is the path
                 URL (file://, http(s)://, ssh://, git@host:path)
                                                  `git clone --mirror` into
                                                  <state-dir>/mirror.git once, then
                                                  `git fetch --prune` before each read

Every failure to read the branch is SourceUnavailable, whose message names the
repository, the branch and what to check. Git runs as a subprocess with a timeout, no
terminal prompts (`GIT_TERMINAL_PROMPT=0`, ssh in batch mode) and in its own process
group, so a hung fetch is killed whole, and `RepoSource.close()` ends one in flight when
the control plane stops. Noticing that the branch moved is watch.py's `RepoWatcher`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from starmesh.reconciler.errors import SourceUnavailable

__all__ = ["GIT_TIMEOUT", "RepoSource", "check_branch", "is_remote"]

GIT_TIMEOUT = 120.0
"""Seconds one `git clone`/`git fetch` may take before it is killed."""

log = logging.getLogger("starmesh.control_plane.source")

_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._~-]+@)?[A-Za-z0-9.-]+:(?!//)")
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
