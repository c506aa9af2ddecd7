"""Fixtures for end-to-end tests: real test apps and real `starmesh proxy` processes.

    test ──aiohttp / raw socket──► proxy outbound ──► (proxy inbound ──►) app
                                      │ admin /readyz polled until ready

`mesh` (function scope) hands a test a `Mesh`: it starts test apps
(tests/runtime/e2e/app.py) and proxies (`python -m starmesh.cli proxy ...`) on
127.0.0.1 with ephemeral ports, compiles policy text into bundle files, writes
endpoint files, and offers small clients. Every process it started is stopped when
the test ends (SIGTERM, then SIGKILL after a grace period) and asserted gone.

`Process`, `Proxy` and `Mesh` are the tests' one way to run a child process: the
conftests of tests/runtime, tests/cli and tests/system load this file by path for them.

Nothing here sleeps to synchronise: readiness is polled with a deadline (the app's
`listening on` line, the proxy's printed addresses and its admin `/readyz`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from starmesh.compiler import compile_tree

APP_SCRIPT = Path(__file__).with_name("app.py")
START_DEADLINE = 20.0
"""Seconds a process may take to print its addresses and become ready."""
STOP_GRACE = 15.0
"""Seconds between SIGTERM and SIGKILL when stopping a process (longer than the proxy's
own 10 s grace for in-flight requests, so only a hung process is killed)."""
POLL_INTERVAL = 0.02

_ADDRESS = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost):(\d+)")


# --------------------------------------------------------------------------- processes


class Process:
    """A child process whose output a reader thread collects line by line.

    The lines are stdout and stderr merged, or, with `stderr=FILE`, stdout alone (stderr
    goes to FILE: for tests that check what a process prints, apart from its log). The
    reader keeps draining the pipe, so a chatty child never blocks on a full pipe. The
    child leads its own process group, so `kill` takes anything it started with it.
    """

    def __init__(self, name: str, argv: Sequence[str], cwd: Path | None = None, *, stderr: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.stderr = stderr
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with contextlib.ExitStack() as files:
            log = subprocess.STDOUT if stderr is None else files.enter_context(open(stderr, "w"))
            self.popen = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self._terminated = False
        self._eof = False
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"reader-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def _report(self, size: int = 4000) -> str:
        """The lines, and the end of the stderr file when there is one: for a failure message."""
        output = "\n".join(self._lines)
        if self.stderr is None:
            return output
        try:
            text = self.stderr.read_text(errors="replace")
        except OSError as exc:
            return f"{output}\n(stderr file {self.stderr}: {exc})"
        return f"{output}\n--- stderr ({self.stderr}) ---\n{text[-size:]}"

    def lines(self) -> list[str]:
        """The lines read so far."""
        with self._changed:
            return list(self._lines)

    def wait_for(self, found: Callable[[list[str]], object], what: str, deadline: float = START_DEADLINE) -> object:
        """Wait until `found(lines)` returns something truthy; fail with the output if not."""
        end = time.monotonic() + deadline
        with self._changed:
            while True:
                result = found(self._lines)
                if result:
                    return result
                if self._eof:  # the process closed its output: it has exited
                    pytest.fail(f"{self.name} exited with {self.popen.wait()} before {what}:\n{self._report()}")
                left = end - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{self.name}: no {what} within {deadline}s:\n{self._report()}")
                self._changed.wait(min(left, 0.2))

    def first_line(self, test: Callable[[str], object], what: str, deadline: float = START_DEADLINE) -> str:
        """The first line `test` accepts, waiting for it as `wait_for` does."""

        def found(lines: list[str]) -> str | None:
            return next((line for line in lines if test(line)), None)

        return str(self.wait_for(found, what, deadline))

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process and whatever it started (its process group)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it exited in between

    def terminate(self) -> None:
        """Ask the process to stop (one SIGTERM, never a second); `stop()` waits for it."""
        if not self._terminated and self.popen.poll() is None:
            self._terminated = True
            self.popen.terminate()

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL after the grace period; returns the exit code."""
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()
                self.popen.wait(STOP_GRACE)
        self._reader.join(STOP_GRACE)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode

    def gone(self) -> bool:
        """True when the process has exited and been reaped: its pid is not our child any more."""
        if self.popen.poll() is None:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return True
        # The pid was reused by an unrelated process: ours has gone if that one is not our child.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        return parent != os.getpid()


# --------------------------------------------------------------------------- HTTP helpers


@dataclass(frozen=True)
class Reply:
    """One HTTP answer as a test sees it; header names lower-cased."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed: float = 0.0
    """Seconds from sending the request to having the whole answer."""

    @property
    def error(self) -> str | None:
        """The proxy's `x-starmesh-error` reason, None when the answer came from upstream."""
        return self.headers.get("x-starmesh-error")

    @property
    def app(self) -> str | None:
        """Which test app answered (`x-app-name`), None when none did."""
        return self.headers.get("x-app-name")

    def json(self) -> object:
        return json.loads(self.body)


@dataclass(frozen=True)
class Call:
    """One request to send: method, path, headers (Host included), body."""

    path: str = "/"
    host: str | None = None
    method: str = "GET"
    headers: Mapping[str, str] | None = None
    body: bytes | None = None


async def _send(session: aiohttp.ClientSession, base: str, call: Call) -> Reply:
    headers = dict(call.headers or {})
    if call.host is not None:
        headers["Host"] = call.host
    started = time.monotonic()
    async with session.request(
        call.method, base + call.path, headers=headers, data=call.body, allow_redirects=False
    ) as response:
        body = await response.read()
        elapsed = time.monotonic() - started
        return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, body, elapsed)


async def send_all(address: str, calls: Sequence[Call], concurrency: int = 16) -> list[Reply]:
    """Send the calls to `address` ("host:port") with up to `concurrency` in flight.

    All requests are released at once when `concurrency >= len(calls)`. Answers come
    back in the order of `calls`.
    """
    base = f"http://{address}"
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:

        async def one(call: Call) -> Reply:
            async with gate:
                return await _send(session, base, call)

        return list(await asyncio.gather(*(one(c) for c in calls)))


def call(address: str, path: str = "/", host: str | None = None, **kwargs: object) -> Reply:
    """Send one request and wait for its answer (a fresh connection each time)."""
    return asyncio.run(send_all(address, [Call(path, host, **kwargs)], 1))[0]  # type: ignore[arg-type]


def many(address: str, n: int, path: str = "/", host: str | None = None, concurrency: int = 16, **kwargs: object) -> list[Reply]:
    """Send the same request n times with up to `concurrency` in flight."""
    calls = [Call(path, host, **kwargs) for _ in range(n)]  # type: ignore[arg-type]
    return asyncio.run(send_all(address, calls, concurrency))


def http_json(url: str, method: str = "GET", payload: object | None = None) -> object:
    """A control-plane style JSON request with urllib (apps' /__stats, proxies' admin)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def http_status(url: str) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        exc.close()
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def raw_exchange(address: str, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send raw bytes on a new connection; read until the peer closes.

    Returns (everything received, whether the peer closed the connection). A peer
    that neither answers nor closes within `timeout` gives closed=False (the
    timeout only keeps a broken proxy from hanging the test).
    """
    host, port = address.rsplit(":", 1)
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may close before reading everything; its answer still counts
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(received), False
            except ConnectionResetError:
                return bytes(received), True
            if not chunk:
                return bytes(received), True
            received += chunk


def status_of(raw: bytes) -> int | None:
    """The status code of the first response in raw bytes."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(match.group(1)) if match else None


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.5) -> tuple[bool, str]:
    """Whether `count` successes out of `n` fit probability `p` within `sigmas` std devs."""
    mean = n * p
    bound = sigmas * math.sqrt(n * p * (1 - p))
    return abs(count - mean) <= bound, f"{count} of {n}, expected {mean:.1f} ± {bound:.1f}"


def poll_until(check: Callable[[], object], what: str, deadline: float = 15.0, interval: float = 0.05) -> object:
    """Call `check` until it returns something truthy; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= end:
            pytest.fail(f"not within {deadline}s: {what} (last: {result!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------- /proc


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets the process holds open (from /proc/<pid>/fd)."""
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_connections(pid: int, remote_port: int | None = None) -> int:
    """Established TCP connections the process holds, optionally only to `remote_port`."""
    inodes = socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], int(fields[9])
            if state != "01" or inode not in inodes:
                continue
            if remote_port is not None and int(remote.rsplit(":", 1)[1], 16) != remote_port:
                continue
            count += 1
    return count


# --------------------------------------------------------------------------- apps and proxies


@dataclass
class App:
    """A running test app (tests/runtime/e2e/app.py)."""

    name: str
    process: Process
    address: str = ""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def wait_listening(self) -> None:
        line = self.process.first_line(lambda line: line.startswith("listening on "), "'listening on' line")
        self.address = line.removeprefix("listening on ").strip()

    def stats(self) -> dict[str, int]:
        """Requests received per "METHOD /path" since the last reset."""
        data = http_json(f"http://{self.address}/__stats")
        assert isinstance(data, dict)
        return dict(data["requests"])

    def hosts(self) -> dict[str, int]:
        """Requests received per Host header since the last reset."""
        data = http_json(f"http://{self.address}/__stats")
        assert isinstance(data, dict)
        return dict(data["hosts"])

    def total(self) -> int:
        data = http_json(f"http://{self.address}/__stats")
        assert isinstance(data, dict)
        return int(data["total"])

    def count(self, key: str) -> int:
        """Requests received for one "METHOD /path"."""
        return self.stats().get(key, 0)

    def reset_stats(self) -> None:
        http_json(f"http://{self.address}/__stats", method="DELETE")

    def force_status(self, status: int | None) -> None:
        """Make every request answer `status` (None: behave normally again)."""
        http_json(f"http://{self.address}/__config", method="POST", payload={"status": status})


@dataclass
class Proxy:
    """A running `starmesh proxy`, the addresses it printed and its state dir.

    `status` is its start-up verdict once `read_status` has seen it: `ready sha256:...`
    or `not ready: <why>`. With its stderr in a file (`log`), `printed` is its stdout."""

    service: str
    process: Process
    outbound: str = ""
    inbound: str = ""
    admin: str = ""
    state_dir: Path | None = None
    status: str = ""

    @property
    def addresses(self) -> dict[str, str]:
        return {"outbound": self.outbound, "inbound": self.inbound, "admin": self.admin}

    @property
    def printed(self) -> list[str]:
        return self.process.lines()

    @property
    def log(self) -> Path:
        assert self.process.stderr is not None, "this proxy's stderr is in its lines, not in a file"
        return self.process.stderr

    def wait_addresses(self) -> None:
        found = self.process.wait_for(_listener_addresses, "listener addresses")
        assert isinstance(found, dict)
        self.outbound, self.inbound, self.admin = found["outbound"], found["inbound"], found["admin"]

    def read_status(self, deadline: float = START_DEADLINE) -> str:
        """Wait for the start-up verdict (`ready ...` or `not ready: ...`) and keep it in `status`."""
        self.status = self.process.first_line(
            lambda line: line.startswith(("ready ", "not ready: ")), "a status line", deadline
        )
        return self.status

    def next_line(self, test: Callable[[str], object], what: str, deadline: float = START_DEADLINE) -> str:
        """The first printed line `test` accepts (e.g. `applied release 2 ...`), waiting for it."""
        return self.process.first_line(test, what, deadline)

    def http(self, listener: str, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        """GET `path` from the `outbound`, `inbound` or `admin` listener (a fresh connection)."""
        return call(self.addresses[listener], path, headers=headers)

    def ready(self) -> bool:
        return http_status(f"http://{self.admin}/readyz") == 200

    def wait_ready(self, deadline: float = START_DEADLINE) -> None:
        end = time.monotonic() + deadline
        while not self.ready():
            if self.process.popen.poll() is not None:
                pytest.fail(f"proxy {self.service} exited with {self.process.popen.returncode}:\n{self.process.output()}")
            if time.monotonic() >= end:
                pytest.fail(f"proxy {self.service} not ready within {deadline}s:\n{self.process.output()}")
            time.sleep(POLL_INTERVAL)

    def config(self) -> dict[str, object]:
        data = http_json(f"http://{self.admin}/config")
        assert isinstance(data, dict)
        return data

    def wait_config(
        self, test: Callable[[dict[str, Any]], object], what: str, deadline: float = START_DEADLINE
    ) -> dict[str, Any]:
        """Poll `/config` until `test` accepts it; fail with the last one seen."""
        end = time.monotonic() + deadline
        while True:
            shown = self.config()
            if test(shown):
                return shown
            if time.monotonic() >= end:
                pytest.fail(f"proxy {self.service}: /config never showed {what} within {deadline}s: {shown}")
            time.sleep(POLL_INTERVAL)

    def stop(self) -> int:
        """SIGTERM, wait (SIGKILL after the grace period); the exit code."""
        return self.process.stop()

    def reload(self) -> None:
        """SIGHUP: re-read the --bundle file."""
        self.process.send_signal(signal.SIGHUP)

    def connections_to(self, port: int) -> int:
        """Established TCP connections from this proxy to `port` (an app's)."""
        return tcp_connections(self.process.pid, port)

    def open_sockets(self) -> int:
        return len(socket_inodes(self.process.pid))


def _listener_addresses(lines: list[str]) -> dict[str, str] | None:
    """The outbound, inbound and admin addresses from the proxy's start-up lines.

    Accepts any line that names a listener and an address, e.g.
    `outbound listening on 127.0.0.1:40123` or `starmesh proxy: admin http://127.0.0.1:1/`.
    """
    found: dict[str, str] = {}
    for line in lines:
        lowered = line.lower()
        address = _ADDRESS.search(line)
        if address is None:
            continue
        for listener in ("outbound", "inbound", "admin"):
            if listener in lowered and listener not in found:
                # The address nearest after the listener's name.
                after = _ADDRESS.search(line, lowered.index(listener))
                if after is not None:
                    found[listener] = f"{after.group(1)}:{after.group(2)}"
    if len(found) == 3:
        return found
    return None


class Mesh:
    """Starts apps and proxies for one test and stops all of them afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[Process] = []
        self._counter = 0

    def _next(self, prefix: str) -> Path:
        self._counter += 1
        path = self.tmp_path / f"{prefix}-{self._counter}"
        path.mkdir(parents=True)
        return path

    def start(self, name: str, argv: Sequence[str], *, stderr: Path | None = None) -> Process:
        """Start a process that `close` stops (see `Process` for `stderr`)."""
        process = Process(name, argv, stderr=stderr)
        self.processes.append(process)
        return process

    # apps

    def apps(self, *names: str, status: int | None = None) -> list[App]:
        """Start test apps (all at once), wait until each listens."""
        started = []
        for name in names:
            argv = [sys.executable, str(APP_SCRIPT), "--port", "0", "--name", name]
            if status is not None:
                argv += ["--status", str(status)]
            started.append(App(name, self.start(f"app {name}", argv)))
        for app in started:
            app.wait_listening()
        return started

    def app(self, name: str, status: int | None = None) -> App:
        return self.apps(name, status=status)[0]

    # config files

    def bundle(self, policy: str, files: Mapping[str, str] | None = None) -> Path:
        """Compile policy text (mesh.star, plus other files) into a bundle file."""
        root = self._next("policy")
        (root / "mesh.star").write_text(policy)
        for name, text in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        result = compile_tree(root)
        assert result.ok, "policy does not compile:\n" + "\n".join(str(f) for f in result.findings)
        errors = [f for f in result.findings if f.severity == "error"]
        assert not errors, errors
        assert result.data is not None
        path = root / "bundle.json"
        path.write_bytes(result.data)
        return path

    def endpoints(self, table: Mapping[str, Mapping[str, Sequence[str]]]) -> Path:
        """Write an --endpoints file: {"service": {"version": ["host:port", ...]}}."""
        path = self._next("endpoints") / "endpoints.json"
        path.write_text(json.dumps({s: {v: list(a) for v, a in versions.items()} for s, versions in table.items()}))
        return path

    # proxies

    def start_proxy(
        self,
        service: str,
        version: str,
        app: str,
        bundle: Path | None,
        endpoints: Path | None = None,
        extra: Sequence[str] = (),
        *,
        state: Path | None = None,
        log: Path | None = None,
    ) -> Proxy:
        """Start a proxy and wait for its addresses (not for readiness).

        `bundle` None: the control-plane form (`extra` gives `--control-plane` and `--trust`).
        `state`: its --state-dir (a new one by default); `log`: a file for its stderr."""
        state = state or self._next(f"state-{service}")
        argv = [
            sys.executable,
            "-m",
            "starmesh.cli",
            "proxy",
            "--service",
            service,
            "--version",
            version,
            "--app",
            app,
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
        ]
        if bundle is not None:
            argv += ["--bundle", str(bundle)]
        if endpoints is not None:
            argv += ["--endpoints", str(endpoints)]
        argv += list(extra)
        proxy = Proxy(service, self.start(f"proxy {service}/{version}", argv, stderr=log), state_dir=state)
        proxy.wait_addresses()
        return proxy

    def proxy(
        self,
        service: str,
        bundle: Path,
        endpoints: Path | None = None,
        version: str = "v1",
        app: str = "127.0.0.1:9",
        extra: Sequence[str] = (),
    ) -> Proxy:
        """Start a proxy and wait until it is ready (its bundle applied)."""
        proxy = self.start_proxy(service, version, app, bundle, endpoints, extra=extra)
        proxy.wait_ready()
        return proxy

    def close(self) -> None:
        running = [p for p in self.processes if p.popen.poll() is None]
        for process in running:
            process.terminate()  # all at once; then wait for each (SIGKILL after the grace)
        for process in self.processes:
            process.stop()
        stuck = [p.name for p in self.processes if not p.gone()]
        assert not stuck, f"processes still running after stop: {stuck}"
        # SIGTERM is a clean stop for apps and proxies alike: exit 0, not killed. (One
        # that had exited on its own already failed the test that waited for it.)
        unclean = {
            p.name: (p.popen.returncode, p.output()[-2000:]) for p in running if p.popen.returncode != 0
        }
        assert not unclean, f"processes did not exit 0 on SIGTERM: {unclean}"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """Apps and proxies for one test; all stopped (and asserted gone) at the end."""
    started = Mesh(tmp_path)
    try:
        yield started
    finally:
        started.close()


@dataclass(frozen=True)
class Helpers:
    """Client helpers for tests (conftest modules cannot be imported in importlib mode)."""

    Call = Call
    call = staticmethod(call)
    many = staticmethod(many)
    send_all = staticmethod(send_all)
    raw_exchange = staticmethod(raw_exchange)
    status_of = staticmethod(status_of)
    binomial_ok = staticmethod(binomial_ok)
    poll_until = staticmethod(poll_until)


@pytest.fixture
def h() -> Helpers:
    """Client helpers: call, many, send_all, raw_exchange, status_of, binomial_ok, poll_until."""
    return Helpers()
