"""What the control-plane benches share: the `starmesh` command, git, and their child
processes (each in its own process group, output to a log file, all stopped at the end)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BenchError", "Children", "free_port", "git", "policy_repo", "start_etcd", "starmesh", "stop_groups", "wait_line"]


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
        stop_groups(self.procs, grace=15)
        self.procs.clear()


def stop_groups(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """End each process's group, in the order given: SIGTERM to all, up to `grace` seconds
    for them to exit, then SIGKILL to each group (a child's own children too)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
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


def free_port() -> int:
    """A loopback port free right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def policy_repo(work: Path, policy: str) -> Path:
    """`work/repo`, a Git repository whose first commit is `policy` as mesh.star, and a
    signing key pair in `work/keys` (signing.key, signing.pub)."""
    repo = work / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "mesh.star").write_text(policy)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    subprocess.run([*starmesh(), "keygen", "--out", str(work / "keys")], check=True, capture_output=True, timeout=60)
    return repo


def start_etcd(children: Children, work: Path, timeout: float) -> tuple[str, int]:
    """A single-member etcd (Debian's /usr/bin/etcd) on loopback ports, its data in `work`;
    (its etcd:// URL for --store, its pid)."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    proc, log = children.start("etcd", [
        "/usr/bin/etcd", "--name", "bench", "--data-dir", str(work / "etcd.data"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap",
    ])  # fmt: skip
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError(f"etcd exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(client + "/health", timeout=2) as answer:
                if b'"true"' in answer.read():
                    return "etcd://" + client.removeprefix("http://"), proc.pid
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError("etcd did not become healthy")
