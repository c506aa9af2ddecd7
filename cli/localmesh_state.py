"""The state dir of `starmesh up`: its layout, its lock, the policy repo and the signing key.

    STATE/                      (default .starmesh under the current directory)
      up.lock                   fcntl.flock'ed while `up` runs; holds its pid
      repo/                     the policy Git repo (branch main), made from the example's
                                policies on the first run and kept as it is afterwards
      keys/signing.key|pub      the release signing key pair (made once)
      ca/ca.crt|ca.key          the mesh CA, join-token: the join token (localmesh_identity.py)
      control-plane/            the control plane's --state-dir (bundles, releases, versions)
      proxies/<service>-<version>/   each sidecar's --state-dir (proxy id, last-known-good)
      logs/<child>.log          each child's stdout and stderr (rotated to .log.1 at 10 MiB)

Everything is reused on the next run: the user's commits to `repo/`, the key every
sidecar's last-known-good trusts, the release versions (which only increase).

If the example's policies are the top of a Git work tree themselves (or the example dir
is, with the policies in it), that repository is used in place and nothing is copied;
an example inside some larger checkout (examples/bookinfo in the starmesh sources) is
copied, so the user's experiments never land in the sources.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from starmesh.cli.localmesh_errors import AlreadyRunning, SetupError
from starmesh.cli.localmesh_example import Example

__all__ = [
    "PolicyRepo",
    "SigningKeys",
    "StateLayout",
    "StateLock",
    "check_git",
    "check_state_dir",
    "prepare_keys",
    "prepare_repo",
]

GIT_TIMEOUT = 60.0
"""Seconds any one git command may take."""
LOCAL_IDENTITY = ("starmesh up", "starmesh-up@localhost.invalid")
"""The Git identity set in a created repo when none is configured (DESIGN.md: `starmesh up`)."""


@dataclass(frozen=True)
class StateLayout:
    """Where each part of a local mesh keeps its files (`root` is absolute)."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "up.lock"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def join_token(self) -> Path:
        return self.root / "join-token"

    @property
    def control_plane(self) -> Path:
        return self.root / "control-plane"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def proxy(self, name: str) -> Path:
        """A sidecar's state dir, `name` being `<service>-<version>`."""
        return self.root / "proxies" / name

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


class StateLock:
    """`STATE/up.lock`, flock'ed for as long as this `starmesh up` runs, with its pid inside."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, layout: StateLayout) -> StateLock:
        """Create the state dir and take its lock; AlreadyRunning when another `up` holds it."""
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            why = exc.strerror or exc
            raise SetupError(f"state dir {layout.root}: cannot use it: {why} (give another --state-dir)") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise AlreadyRunning(int(holder) if holder.isdigit() else None, layout.root) from None
        except OSError as exc:
            os.close(fd)
            raise SetupError(f"{layout.lock}: cannot lock it: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, layout.lock)

    def release(self) -> None:
        """Empty the file and drop the lock (the file stays: removing it would race a new `up`)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock


@dataclass(frozen=True)
class PolicyRepo:
    """The Git repository the control plane follows, and where the policy root is in it."""

    path: Path
    subdir: str
    """The policy root relative to `path` ("" for its top): the control plane's --subdir."""
    branch: str
    created: bool
    commit: str

    @property
    def policy_root(self) -> Path:
        return self.path / self.subdir if self.subdir else self.path


@dataclass(frozen=True)
class SigningKeys:
    """The release signing key pair in STATE/keys."""

    private: Path
    public: Path
    created: bool


def check_state_dir(example: Example, layout: StateLayout) -> None:
    """SetupError when the state dir lies inside the policies (the copy would copy itself)."""
    if layout.root.is_relative_to(example.policies):
        raise SetupError(
            f"the state dir {layout.root} is inside the policies {example.policies}: give --state-dir elsewhere"
        )


def check_git() -> None:
    """SetupError when git is not installed: the policy lives in a Git repository."""
    if shutil.which("git") is None:
        raise SetupError(
            "git is not installed (or not on PATH): starmesh up keeps the policy in a Git repository; install git"
        )


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"git {' '.join(args)} in {cwd}: {exc}") from exc
    if check and done.returncode != 0:
        why = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
        raise SetupError(f"git {' '.join(args)} in {cwd} failed: {why}")
    return done


def _own_repo(example: Example) -> PolicyRepo | None:
    """The repository the example's policies are the top of (or the example dir is), if any."""
    found = _git(example.policies, "rev-parse", "--show-toplevel", check=False)
    if found.returncode != 0:
        return None
    top = Path(found.stdout.strip()).resolve()
    if top not in (example.policies, example.root):
        return None  # inside a larger checkout: copy instead
    branch = _git(top, "symbolic-ref", "--quiet", "--short", "HEAD", check=False).stdout.strip()
    if not branch:
        raise SetupError(f"{top}: HEAD is detached; check out the branch the control plane should follow")
    head = _git(top, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).stdout.strip()
    if not head:
        raise SetupError(f"{top}: branch {branch} has no commits yet; commit the policies first")
    subdir = example.policies.relative_to(top).as_posix()
    return PolicyRepo(top, "" if subdir == "." else subdir, branch, created=False, commit=head)


def _set_identity(repo: Path) -> None:
    """Set user.name/user.email in `repo` when git would otherwise refuse to commit."""
    for key, value in zip(("user.name", "user.email"), LOCAL_IDENTITY, strict=True):
        if not _git(repo, "config", key, check=False).stdout.strip():
            _git(repo, "config", "--local", key, value)


def _create_repo(example: Example, layout: StateLayout) -> PolicyRepo:
    """Copy the policies into a new repo with one commit, then move it into place."""
    for stale in layout.root.glob("repo.tmp-*"):  # a crashed run's leftovers (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    building = layout.root / f"repo.tmp-{os.getpid()}"
    try:
        shutil.copytree(example.policies, building, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    except OSError as exc:
        raise SetupError(f"cannot copy {example.policies} to {building}: {exc}") from exc
    _git(building, "init", "-q", "-b", "main")
    _set_identity(building)
    _git(building, "add", "-A")
    _git(building, "-c", "commit.gpgsign=false", "commit", "-q", "-m", f"Initial policy from {example.given}")
    head = _git(building, "rev-parse", "HEAD").stdout.strip()
    building.rename(layout.repo)
    return PolicyRepo(layout.repo, "", "main", created=True, commit=head)


def prepare_repo(example: Example, layout: StateLayout) -> PolicyRepo:
    """The policy repo: the example's own, STATE/repo as it is, or a new STATE/repo."""
    own = _own_repo(example)
    if own is not None:
        return own
    if not layout.repo.exists():
        return _create_repo(example, layout)
    head = _git(layout.repo, "rev-parse", "--verify", "--quiet", "refs/heads/main^{commit}", check=False).stdout.strip()
    if not head:
        raise SetupError(
            f"{layout.repo} exists but is not a Git repository with a branch main; "
            "move it away (starmesh up makes a new one) or use another --state-dir"
        )
    return PolicyRepo(layout.repo, "", "main", created=False, commit=head)


def prepare_keys(layout: StateLayout) -> SigningKeys:
    """STATE/keys/signing.key|pub: made on the first run, checked and reused afterwards."""
    from starmesh.bundle.errors import BundleError
    from starmesh.bundle.keys import (
        PRIVATE_KEY_FILE,
        PUBLIC_KEY_FILE,
        generate_keypair,
        keyid_of,
        load_private_key,
        load_public_key,
    )

    private, public = layout.keys / PRIVATE_KEY_FILE, layout.keys / PUBLIC_KEY_FILE
    present = [path for path in (private, public) if path.exists()]
    try:
        if not present:
            generate_keypair(layout.keys)
            return SigningKeys(private, public, created=True)
        if len(present) == 1:
            raise SetupError(
                f"{present[0]} exists without its pair; remove {layout.keys} and {layout.root / 'proxies'} "
                "to start with a new key"
            )
        if keyid_of(load_private_key(private)) != keyid_of(load_public_key(public)):
            raise SetupError(
                f"{private} and {public} are not one key pair; remove {layout.keys} to start with a new key"
            )
    except BundleError as exc:
        raise SetupError(f"signing key: {exc}") from exc
    return SigningKeys(private, public, created=False)
