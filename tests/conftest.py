"""Fixtures every test folder may use: a real etcd (high availability, issue 9).

    etcd_server                     a fresh single-member etcd on loopback, its data in tmp_path
      .url                          "etcd://127.0.0.1:<client port>" (what --store takes)
      .client_url                   "http://127.0.0.1:<client port>"
      .kill()                       SIGKILL, as a crash would (data stays)
      .stop()                       SIGTERM and wait
      .start()                      start again on the same ports and data dir (after kill/stop)
      .running                      whether the process is up

    etcd_factory(name)              another one (a test needing two separate etcds)

The `etcd` binary comes from Debian's `etcd-server`, which .ci/run installs. Without it the
tests that need it skip, except under CI, where a missing etcd is a failure. Every etcd
started is stopped at the end of its test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ETCD_START_DEADLINE = 30.0
"""Seconds etcd may take to answer /health after it starts: a bound, not a speed assertion."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _PortTaken(RuntimeError):
    """etcd could not bind its ports: another process took them after they were picked."""


class EtcdServer:
    """One etcd process on loopback with its own data dir; restartable on the same ports."""

    def __init__(self, binary: str, directory: Path, name: str = "etcd") -> None:
        self.binary = binary
        self.directory = directory
        self.name = name
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.client_url = f"http://127.0.0.1:{self.client_port}"
        self.url = f"etcd://127.0.0.1:{self.client_port}"
        self.log = directory / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start (again: on the same ports and data). A first start whose ports another test
        took meanwhile (they are picked free, then released) retries on new ones."""
        for attempt in range(3):
            try:
                self._start()
                self._started = True
                return
            except _PortTaken:
                if self._started or attempt == 2:
                    raise
                self.client_port, self.peer_port = _free_port(), _free_port()
                self.client_url = f"http://127.0.0.1:{self.client_port}"
                self.url = f"etcd://127.0.0.1:{self.client_port}"

    def _start(self) -> None:
        assert not self.running, "etcd is running already"
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.directory / f"{self.name}.data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--logger", "zap",
            # tests run on a shared machine: no fsync-bound latency alarms in the log
            "--unsafe-no-fsync",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ETCD_START_DEADLINE
        while True:
            if self._process.poll() is not None:
                if "address already in use" in self.log.read_text(errors="replace")[-2000:]:
                    raise _PortTaken(self.client_url)
                raise RuntimeError(f"etcd exited with {self._process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.client_url + "/health", timeout=2) as answer:
                    if b'"true"' in answer.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"etcd did not become healthy in {ETCD_START_DEADLINE}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _etcd_binary() -> str:
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed: .ci/run installs Debian's etcd-server")
        pytest.skip("etcd is not installed (apt install etcd-server)")
    return binary


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[[str], EtcdServer]]:
    started: list[EtcdServer] = []
    binary = _etcd_binary()

    def make(name: str = "etcd") -> EtcdServer:
        server = EtcdServer(binary, tmp_path, name)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def etcd_server(etcd_factory: Callable[[str], EtcdServer]) -> EtcdServer:
    return etcd_factory("etcd")
