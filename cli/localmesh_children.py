"""The child processes of `starmesh up`: started in their own process group, logged to a
bounded file, watched for their start-up lines, and always stopped.

    starmesh up (asyncio)
      └─ Child ── process group (setsid) ── the child (and anything it forks)
           │  stdout+stderr ─pipe─► reader task ─► STATE/logs/<name>.log  (rotated at 10 MiB)
           │                             └──────► start-up lines (expect) and the last lines (tail)
           └─ stop: SIGTERM to the group ─► wait (grace) ─► SIGKILL to the group

Three guards keep a child from outliving `up`: `stop_all` in the command's finally
block; an atexit hook (`_reap_leftovers`) for an `up` that dies of an exception; and,
on Linux, the parent-death signal (prctl PR_SET_PDEATHSIG = SIGTERM), so even a
SIGKILLed `up` takes its children with it. Children live in their own process groups,
so a Ctrl-C in the terminal reaches only `up`, which then stops them in order.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from starmesh.cli.localmesh_errors import StartFailed

__all__ = ["MAX_LOG_BYTES", "Child", "ChildSpec", "free_ports", "stop_all"]

T = TypeVar("T")

MAX_LOG_BYTES = 10 * 1024 * 1024
"""A child's log is rotated to `<name>.log.1` past this size (so at most twice this on disk)."""
_CHUNK = 64 * 1024
_MAX_PARTIAL_LINE = 64 * 1024
_STARTUP_LINES = 1000
"""Lines kept for `expect`; start-up lines come first, so later lines need not be."""
_TAIL_LINES = 20
_KILL_WAIT = 5.0

_live: dict[int, str] = {}
"""pid (= process group id) -> name of every child not yet reaped, for the atexit guard."""


@dataclass(frozen=True)
class ChildSpec:
    """What to run: a name for messages and the log file, argv, and where."""

    name: str
    argv: tuple[str, ...]
    log: Path
    cwd: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    """Set in the child's environment on top of ours (secrets go here, not in argv: ps shows argv)."""


class BoundedLog:
    """A log file that starts afresh on open (the old one becomes `.1`) and rotates at `limit`.

    A write that fails (a full disk) turns the log off, with the reason in `broken`: the
    child's output is still read, so the child never blocks on a full pipe."""

    def __init__(self, path: Path, limit: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.limit = limit
        self.broken: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._rotate_old()
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._size = 0

    def _rotate_old(self) -> None:
        if self.path.exists():
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))

    def write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            if self._size + len(data) > self.limit:
                self._file.close()
                self._rotate_old()
                self._file = open(self.path, "wb")  # noqa: SIM115
                self._size = 0
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
        except OSError as exc:
            self.broken = f"{self.path}: writing stopped: {exc.strerror or exc}"
            self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook that makes the child get SIGTERM when `up` dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # `up` died between fork and prctl
            os._exit(1)

    return arm


class Child:
    """One running child; make it with `Child.spawn`."""

    def __init__(self, spec: ChildSpec, process: asyncio.subprocess.Process, log: BoundedLog) -> None:
        self.spec = spec
        self.process = process
        self._log = log
        self._lines: list[str] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._changed = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"read {spec.name}")

    @classmethod
    async def spawn(cls, spec: ChildSpec) -> Child:
        """Start the child in a new session (its own process group) with its output piped to us."""
        try:
            log = BoundedLog(spec.log)
        except OSError as exc:
            raise StartFailed(f"{spec.name}: cannot write its log {spec.log}: {exc.strerror or exc}") from exc
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(spec.env)
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        except OSError as exc:
            log.close()
            raise StartFailed(f"{spec.name}: cannot start {spec.argv[0]}: {exc.strerror or exc}") from exc
        _live[process.pid] = spec.name
        return cls(spec, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def tail(self) -> list[str]:
        """The child's last lines of output (at most 20)."""
        return list(self._tail)

    def describe_exit(self) -> str:
        """`exited with code 1` / `was killed by SIGKILL`, with where its log is."""
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        log = self._log.broken or self.spec.log
        return f"{self.spec.name} {how} (log: {log})"

    async def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        partial = b""
        try:
            while chunk := await stream.read(_CHUNK):
                self._log.write(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                if len(partial) > _MAX_PARTIAL_LINE:
                    lines.append(partial)
                    partial = b""
                await self._add(line.decode("utf-8", "replace").rstrip("\r") for line in lines)
        finally:
            if partial:
                await self._add([partial.decode("utf-8", "replace")])
            self._log.close()
            async with self._changed:
                self._eof = True
                self._changed.notify_all()

    async def _add(self, lines: Iterable[str]) -> None:
        async with self._changed:
            for line in lines:
                self._tail.append(line)
                if len(self._lines) < _STARTUP_LINES:
                    self._lines.append(line)
            self._changed.notify_all()

    async def expect(self, pick: Callable[[str], T | None], what: str, deadline: float) -> T:
        """The first line `pick` turns into a value; StartFailed if the child exits or `deadline` passes."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        seen = 0
        async with self._changed:
            while True:
                for line in self._lines[seen:]:
                    found = pick(line)
                    if found is not None:
                        return found
                seen = len(self._lines)
                if self._eof:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.process.wait(), _KILL_WAIT)
                    raise StartFailed(f"{self.describe_exit()} before {what}{self._last_lines()}")
                left = end - loop.time()
                if left <= 0:
                    late = f"{self.spec.name}: no {what} within {deadline:.0f}s (log: {self.spec.log})"
                    raise StartFailed(late + self._last_lines())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def _last_lines(self) -> str:
        tail = self.tail()[-5:]
        return "; last lines:\n" + "\n".join(f"  {line}" for line in tail) if tail else ""

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the child's process group (nothing if the group is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the child to exit; whether it has."""
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        _live.pop(self.pid, None)
        return True

    async def finish(self) -> None:
        """After the child exited: drain its output into the log (bounded) and close it."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), _KILL_WAIT)
        if not self._reader.done():  # a grandchild keeps the pipe open
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def stop_all(children: Sequence[Child], grace: float, force: asyncio.Event | None = None) -> list[Child]:
    """SIGTERM every child's group, wait up to `grace` (or until `force` is set), SIGKILL the rest.

    Returns the children that had to be killed. Every group that was running gets a last
    SIGKILL, so a grandchild left behind by a child that exited goes too."""
    running = [child for child in children if child.returncode is None]
    for child in running:
        child.signal_group(signal.SIGTERM)

    async def exited() -> None:
        await asyncio.gather(*(child.wait(grace) for child in running))

    async def forced() -> None:
        if force is not None:
            await force.wait()
        else:
            await asyncio.Event().wait()  # never: wait for the grace period

    waits, kill_now = asyncio.create_task(exited()), asyncio.create_task(forced())
    await asyncio.wait([waits, kill_now], return_when=asyncio.FIRST_COMPLETED)
    kill_now.cancel()
    killed = [child for child in running if child.returncode is None]
    for child in running:
        child.signal_group(signal.SIGKILL)
    for child in killed:
        await child.wait(_KILL_WAIT)
    if not waits.done():
        await waits  # each wait is bounded by `grace`
    await asyncio.gather(*(child.finish() for child in children))
    for child in children:
        if child.returncode is not None:
            _live.pop(child.pid, None)
    return killed


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bound together, read, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _reap_leftovers() -> None:
    """atexit: stop any child still running (only when `up` ended without stopping them)."""
    if not _live:
        return
    for pid in list(_live):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + _KILL_WAIT
    while _live and time.monotonic() < end:
        for pid in list(_live):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                _live.pop(pid, None)
        time.sleep(0.05)
    for pid in list(_live):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _live.clear()


atexit.register(_reap_leftovers)
