"""`starmesh status` over a live mesh, `--watch`, and the control plane's `/metrics`.

    git commit ──► starmesh control-plane ──long-poll──► starmesh proxy app/v1 ──► test app
                   (subprocess, 127.0.0.1:0)  ◄─heartbeats, requests_total─┐      ▲
                      ▲                                  starmesh proxy front/v1 ─┘ (traffic)
                      └── starmesh status [--watch] (CliRunner, or a subprocess on a pipe or a pty)

Everything is a real process (the `/metrics` test plays its proxies through the real
proxy API, for exact counts). The proxy of `front` trusts only the first signing key:
after the control plane restarts with a second key, it refuses the next release and
stays one release behind, which `status` shows with its NACK reason. Waits poll for a
condition with a deadline; nothing asserts on elapsed time.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.main import main

DEADLINE = 30.0  # seconds; a bound on waiting for a condition, never an assertion about speed
STARMESH = Path(sys.executable).with_name("starmesh")

POLICY = """\
mesh(name = "shop", mtls = "disable", rollout = rollout(max_failures = 5))

service(name = "front", versions = ["v1"])
service(name = "app", versions = ["v1"])

http_route(service = "app", rules = [rule(backends = {{"v1": 100}}, timeout = "{timeout}")])
"""

BROKEN = 'mesh(name = "shop"\nservice(name = "app")\n'


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None, "NO_PROXY": "*", "no_proxy": "*"})


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


def status_json(runner: CliRunner, url: str) -> dict[str, Any]:
    result = run(runner, "status", "--control-plane", url, "--format", "json")
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.output)
    return document


def wait_for(check: Callable[[], Any], what: str) -> Any:
    end = time.monotonic() + DEADLINE
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"never saw {what} (last: {found!r})")
        time.sleep(0.05)


class Plane:
    """The control plane's arguments and its running process (restarted with another key)."""

    def __init__(self, tmp: Path, control_planes: Any, h: Any) -> None:
        self.control_planes, self.h = control_planes, h
        self.repo = h.make_repo(tmp / "repo")
        self.state = tmp / "cp-state"
        self.key, self.public = generate_keypair(tmp / "keys")
        self.process: Any = None
        self.url = ""

    def start(self, key: Path, listen: str = "127.0.0.1:0") -> None:
        self.process = self.control_planes.start([
            "--repo", str(self.repo), "--branch", "main", "--key", str(key), "--state-dir", str(self.state),
            "--listen", listen, "--proxy-ttl", "3", "--poll-interval", "1",
        ])  # fmt: skip
        self.url = "http://" + self.process.wait_listening()
        self.process.process.first_line(lambda line: line.startswith("ready release "), "ready", DEADLINE)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=DEADLINE) as answer:  # noqa: S310 - loopback
            assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
def plane(tmp_path: Path, control_planes: Any, h: Any) -> Plane:
    made = Plane(tmp_path, control_planes, h)
    h.commit(made.repo, POLICY.format(timeout="5s"), "first")
    made.start(made.key)
    return made


@pytest.fixture
def traffic() -> Iterator[Callable[[str], None]]:
    """`traffic(outbound)`: requests to `app` through that proxy, over and over, until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def send(outbound: str) -> None:
        while not stop.is_set():
            request = urllib.request.Request(f"http://{outbound}/", headers={"host": "app"})
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - loopback
                    answer.read()
            except OSError:
                pass  # a refused or failed request still counts at the proxy, or is retried
            stop.wait(0.02)

    def start(outbound: str) -> None:
        threads.append(threading.Thread(target=send, args=(outbound,), daemon=True))
        threads[-1].start()

    try:
        yield start
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)


# -- a live mesh: request rates, a proxy behind, the table -----------------------------------


def test_status_shows_request_rates_and_a_proxy_left_behind(
    runner: CliRunner, plane: Plane, mesh: Any, h: Any, tmp_path: Path, traffic: Callable[[str], None]
) -> None:
    rotated, rotated_public = generate_keypair(tmp_path / "rotated")
    app = mesh.app("app-v1")
    both = ["--control-plane", plane.url, "--trust", str(plane.public), "--trust", str(rotated_public)]
    app_proxy = mesh.start_proxy("app", "v1", app.address, None, extra=both)
    front = mesh.start_proxy("front", "v1", "127.0.0.1:9", None, extra=both[:4])  # the first key only
    app_proxy.wait_ready()
    front.wait_ready()
    traffic(front.outbound)

    def rates() -> dict[str, Any] | None:
        document = status_json(runner, plane.url)
        proxies = {p["service"]: p for p in document["proxies"]}
        busy = len(proxies) == 2 and all((p["request_rate"] or 0) > 0 for p in proxies.values())
        return proxies if busy else None

    proxies = wait_for(rates, "both proxies with a request rate")  # front counts outbound, app inbound
    for proxy in proxies.values():
        assert (proxy["state"], proxy["release_version"], proxy["releases_behind"]) == ("synced", 1, 0)
        assert proxy["desired_release_version"] == 1
        assert 0 <= proxy["last_seen_seconds_ago"] < DEADLINE

    # The control plane restarts with the second key; the next release is signed with it.
    address = plane.url.removeprefix("http://")
    assert plane.process.process.stop() == 0
    plane.start(rotated, listen=address)
    h.commit(plane.repo, POLICY.format(timeout="4s"), "signed with the new key")

    def front_behind() -> dict[str, Any] | None:
        document = status_json(runner, plane.url)
        by_service = {p["service"]: p for p in document["proxies"]}
        ready = document["release"]["version"] == 2 and by_service.get("front", {}).get("state") == "failed"
        return document if ready and by_service.get("app", {}).get("state") == "synced" else None  # app may not be back yet

    document = wait_for(front_behind, "front failed on release 2, app synced")
    by_service = {p["service"]: p for p in document["proxies"]}
    assert (by_service["front"]["release_version"], by_service["front"]["desired_release_version"]) == (1, 2)
    assert by_service["front"]["releases_behind"] == 1
    assert "key" in by_service["front"]["error"].lower()
    assert (by_service["app"]["release_version"], by_service["app"]["releases_behind"]) == (2, 0)

    result = run(runner, "status", "--control-plane", plane.url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(r"proxies        2: 1 failed, 1 synced; 1 behind", next(x for x in lines if x.startswith("proxies ")))
    header = next(line for line in lines if line.startswith("ID "))
    assert header.split() == ["ID", "SERVICE", "VERSION", "RELEASE", "BUNDLE", "STATE", "BEHIND", "REQ/S", "ERROR",
                              "LAST", "SEEN"]  # fmt: skip
    rows = [line for line in lines[lines.index(header) + 2 :] if line.strip()]
    assert [row.split()[1] for row in rows] == ["app", "front"]  # by service, then id
    app_row, front_row = (row.split() for row in rows)
    assert app_row[3:7] == ["2", document["release"]["bundle"][:19], "synced", "0"]
    assert front_row[3] == "1" and front_row[5:7] == ["failed", "1"]
    assert re.fullmatch(r"\d+\.\d+|-", app_row[7]) and "key" in rows[1].lower()
    assert rows[0].endswith(" ago") and rows[1].endswith(" ago")


# -- the control plane's /metrics ------------------------------------------------------------


def test_the_control_plane_process_serves_its_metrics(plane: Plane, h: Any) -> None:
    def value(name: str, **labels: str) -> float:
        samples = plane.metrics()
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("starmesh_compile_total", result="ok") == 1
    assert value("starmesh_compile_duration_seconds_count", result="ok") == 1
    assert value("starmesh_releases_issued_total", reason="commit") == 1
    assert value("starmesh_release_version") == 1
    assert value("starmesh_rollout_phase", phase="complete") == 1

    h.commit(plane.repo, BROKEN, "broken")
    wait_for(lambda: value("starmesh_compile_total", result="rejected") == 1, "the rejected commit counted")
    assert value("starmesh_compile_total", result="ok") == 1 and value("starmesh_releases_issued_total", reason="commit") == 1

    # Two proxies through the real proxy API: one ACKs release 1, one NACKs it.
    bundle = plane.process.status()["release"]["bundle"]
    for proxy_id, error in (("p1", None), ("p2", "release 1: golden request failed")):
        beat = {"service": "app", "version": "v1", "address": "127.0.0.1:9", "requests_total": 0}
        assert plane.process.post(f"/v1/proxies/{proxy_id}", beat) == 200
        assert plane.process.post(f"/v1/proxies/{proxy_id}/status", {"version": 1, "bundle": bundle, "error": error}) == 200
    assert value("starmesh_nacks_total") == 1
    assert (value("starmesh_proxies", state="synced"), value("starmesh_proxies", state="failed")) == (1, 1)
    assert value("starmesh_rollout_acked_proxies") == 1 and value("starmesh_rollout_targeted_proxies") == 2


# -- --watch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["text", "json"])
def test_watch_on_a_pipe_prints_again_each_interval_until_ctrl_c(plane: Plane, mesh: Any, output_format: str) -> None:
    argv = [str(STARMESH), "status", "--control-plane", plane.url, "--watch", "0.2", "--format", output_format]
    watcher = mesh.start("status --watch", argv)
    if output_format == "text":
        watcher.wait_for(lambda lines: sum(line.startswith("control plane  ") for line in lines) >= 2, "two tables", DEADLINE)
    else:
        watcher.wait_for(lambda lines: len(lines) >= 2, "two documents", DEADLINE)
    watcher.send_signal(signal.SIGINT)
    assert watcher.popen.wait(DEADLINE) == 0
    lines = watcher.lines()
    assert not [line for line in lines if "Traceback" in line or "Aborted" in line], lines
    if output_format == "json":
        documents = [json.loads(line) for line in lines]  # one compact document per line
        assert all(d["release"]["version"] == 1 for d in documents)
    else:
        assert sum(line.startswith("release        1  bundle sha256:") for line in lines) >= 2


def test_watch_outlives_a_control_plane_that_goes_away(plane: Plane, mesh: Any) -> None:
    watcher = mesh.start("status --watch", [str(STARMESH), "status", "--control-plane", plane.url, "--watch", "0.2"])
    watcher.first_line(lambda line: line.startswith("control plane  "), "a table", DEADLINE)
    assert plane.process.process.stop() == 0
    message = f"starmesh: error: cannot reach the control plane at {plane.url}/v1/status:"
    watcher.wait_for(lambda lines: sum(line.startswith(message) for line in lines) >= 2, "the error, twice", DEADLINE)
    assert watcher.popen.poll() is None  # still watching: the next refresh tries again
    watcher.send_signal(signal.SIGINT)
    assert watcher.popen.wait(DEADLINE) == 0


def test_watch_on_a_terminal_redraws_in_place(plane: Plane) -> None:
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")} | {"TERM": "xterm", "COLUMNS": "160"}
    child = subprocess.Popen(
        [str(STARMESH), "status", "--control-plane", plane.url, "--watch", "0.2"],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        end = time.monotonic() + DEADLINE
        while seen.count(b"control plane") < 3 and time.monotonic() < end:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    seen += os.read(controller, 65536)
                except OSError:
                    break
        assert seen.count(b"control plane") >= 3, seen[-2000:]
        child.send_signal(signal.SIGINT)
        assert child.wait(DEADLINE) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(DEADLINE)
        os.close(controller)
    assert b"\x1b[2K" in seen or b"\x1b[1A" in seen  # the cursor goes back up: redrawn, not scrolled
    assert b"Ctrl-C to stop" in seen and b"Traceback" not in seen


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "0.0 is not in the range 0.1<=x<=3600"), ("0.05", "0.05 is not in the range 0.1<=x<=3600"),
     ("soon", "'soon' is not a valid float range")],
)  # fmt: skip
def test_a_bad_watch_interval_is_exit_2(runner: CliRunner, value: str, message: str) -> None:
    # Checked before any request: nothing listens on port 9.
    result = run(runner, "status", "--control-plane", "http://127.0.0.1:9", f"--watch={value}")
    assert result.exit_code == 2
    assert f"Invalid value for '--watch': {message}" in result.output
