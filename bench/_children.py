"""What the control-plane benches share: the `starmesh` command, git, and their child
processes (each in its own process group, output to a log file, all stopped at the end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BenchError", "Children", "git", "starmesh", "wait_line"]


class BenchError(Exception):
    """The bench cannot go on; the message says why (a process exited, a wait ran out)."""


def starmesh() -> list[str]:
    """The `starmesh` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("starmesh")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "starmesh.cli"]


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", *args],
        cwd=repo, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


class Children:
    """The bench's processes, each in its own group with a log file; stop_all() ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir
            )
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=5)
        self.procs.clear()


def wait_line(log: Path, proc: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
    """The first line of `log` starting with `prefix`; BenchError when the process exits first
    or `timeout` seconds pass (with the end of the log)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            raise BenchError(f"{log.name}: exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"{log.name}: no {prefix!r} line within {timeout:.0f}s:\n{log.read_text(errors='replace')[-2000:]}")
