"""Helpers the reconciler tests share, handed out as the `h` fixture.

In importlib mode a test module can import neither another test module nor this file,
so the helpers come as one object (as tests/runtime/e2e/conftest.py's `h` does):

    h.make_repo(path)                 a Git repo on branch main, committer set, unsigned commits
    h.commit(repo, {name: text})      write, add and commit files; the new commit's sha
    h.git(repo, *args)                git in that repo; its stdout, stripped
    h.policy(to, expect=)             mesh.star for service `api` routed to `to` (golden request too)
    h.rollout_policy(v1, percent=...) mesh.star for `reviews`, v1% to v1, the rest to v2, rolled out
                                      through percent% canaries (bake=, max_failures= too)
    h.keys(directory)                 a new Ed25519 key pair: .private/.public paths, .signer(), .trusted()
    h.compile_policy(root, text)      root/mesh.star compiled: the bundle's bytes
    h.Clock(now)                      a clock the test moves by hand (`clock.now += ...`)
    h.until(test, what)               poll `test()` (or await it) until true, at most DEADLINE s
    h.run(main)                       asyncio.run(main())

and `open_store(**options)`, started EtcdStores on the test's etcd (`etcd_server`), closed
at the end.

Everything is real: git subprocesses, the compiler, Ed25519 keys written to tmp_path.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from starmesh.bundle.keys import PrivateKey, PublicKey, generate_keypair, load_private_key, load_public_key
from starmesh.compiler.compile import compile_tree
from starmesh.reconciler.etcd_client import parse_etcd_url
from starmesh.reconciler.etcd_store import EtcdStore

DEADLINE = 30.0
"""Seconds a wait may take: a bound on waiting, never an assertion about speed."""

POLICY = """\
mesh(name = "shop", mtls = "disable")
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{to}": 100}})])
request_test(name = "default route", service = "api", backends = "{expect}")
"""

ROLLOUT_POLICY = """\
mesh(name = "shop", mtls = "disable",
     rollout = rollout(canary_percent = {percent}, bake = "{bake}", max_failures = {max_failures}))
service(name = "reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""

T = TypeVar("T")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def make_repo(path: Path, *, bare: bool = False) -> Path:
    """A new repository at `path` (created), branch main, with a local committer."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main", *(["--bare"] if bare else []))
    git(path, "config", "user.name", "starmesh tests")
    git(path, "config", "user.email", "tests@starmesh.invalid")
    git(path, "config", "commit.gpgsign", "false")
    return path


def commit(repo: Path, files: dict[str, str], *, branch: str | None = None) -> str:
    """Write `files` (path -> text), commit them and return the sha; on `branch` when given
    (checked out, created if new), else on the branch checked out now."""
    if branch is not None and git(repo, "branch", "--show-current") != branch:
        exists = subprocess.run(["git", "-C", str(repo), "rev-parse", "-q", "--verify", branch], capture_output=True)
        git(repo, "checkout", "-q", *([branch] if exists.returncode == 0 else ["-b", branch]))
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
        git(repo, "add", name)
    git(repo, "commit", "-q", "-m", "change " + ", ".join(files))
    return git(repo, "rev-parse", "HEAD")


def policy(to: str, expect: str | None = None) -> str:
    """Service `api` routed wholly to version `to`; its golden request expects `expect` (`to`)."""
    return POLICY.format(to=to, expect=expect or to)


def rollout_policy(v1: int, *, percent: int, bake: str = "0s", max_failures: int = 0) -> str:
    """Service `reviews` with v1% of its traffic on v1 and the rest on v2, released to
    `percent`% canaries first, baking for `bake`, failing after `max_failures` NACKs."""
    return ROLLOUT_POLICY.format(percent=percent, bake=bake, max_failures=max_failures, v1=v1, v2=100 - v1)


@dataclass(frozen=True)
class Keys:
    """A signing key pair on disk (`signing.key`, `signing.pub`)."""

    private: Path
    public: Path

    def signer(self) -> PrivateKey:
        return load_private_key(self.private)

    def trusted(self) -> list[PublicKey]:
        """The public key as `verify_release` takes it."""
        return [load_public_key(self.public)]


def keys(directory: Path) -> Keys:
    """A new key pair written into `directory` (created)."""
    private, public = generate_keypair(directory)
    return Keys(private, public)


def compile_policy(root: Path, text: str) -> bytes:
    """`text` as root/mesh.star (root created if need be), compiled: the bundle's bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mesh.star").write_text(text)
    result = compile_tree(root)
    assert result.data is not None, result.findings
    return result.data


class Clock(Generic[T]):
    """A clock the test moves by hand: `clock()` is `clock.now`."""

    def __init__(self, now: T) -> None:
        self.now = now

    def __call__(self) -> T:
        return self.now


async def until(test: Callable[[], bool] | Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `test` (a plain or an async check) until it is true; fail after DEADLINE s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        outcome = test()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


@dataclass(frozen=True)
class Helpers:
    """The helpers above, as the `h` fixture hands them to a test."""

    DEADLINE = DEADLINE
    Clock = Clock
    Keys = Keys
    git = staticmethod(git)
    make_repo = staticmethod(make_repo)
    commit = staticmethod(commit)
    policy = staticmethod(policy)
    rollout_policy = staticmethod(rollout_policy)
    keys = staticmethod(keys)
    compile_policy = staticmethod(compile_policy)
    until = staticmethod(until)
    run = staticmethod(run)


@pytest.fixture
def open_store(etcd_server: Any) -> Iterator[Callable[..., EtcdStore]]:
    """`open_store(**options)`: a started EtcdStore on the test's etcd (one per replica), 2 s
    calls and a 0.1 s probe unless told otherwise; every one is closed at the end."""
    opened: list[EtcdStore] = []

    def make(**options: Any) -> EtcdStore:
        options.setdefault("timeout", 2.0)
        options.setdefault("probe_interval", 0.1)
        store = EtcdStore(parse_etcd_url(etcd_server.url), **options)
        opened.append(store)
        store.start()
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def h() -> Helpers:
    """Repo, key, compile, clock and waiting helpers (see the module docs)."""
    return Helpers()
