"""`starmesh proxy --control-plane URL --trust FILE`: real proxy processes against a control-plane double.

What is process-level is tested with processes: the command line, start-up from
last-known-good while the control plane is down, the proxy id kept across restarts, a
replay after a restart, and a kill -9 at any moment during persists. The double
(tests/runtime/control_plane_double.py) signs real releases with a real key.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.keys import PrivateKey, generate_keypair
from starmesh.cli.main import main
from starmesh.runtime.lkg import GENERATION_FILES, load_state
from starmesh.runtime.proxy import CONTROL_PLANE_PLAINTEXT_NOTICE

DEADLINE = 30.0
"""Seconds to wait for a process; a bound on waiting, never an assertion about speed."""


@pytest.fixture
def start_proxy(proxies: Any) -> Callable[..., Any]:
    """start_proxy(urls, trust): a control-plane-form proxy (tests/runtime/conftest.py), its status read."""

    def start(urls: list[str], trust: list[Path]) -> Any:
        return proxies.start(control_plane=urls, trust=trust)

    return start


# -- the command line ------------------------------------------------------------------------


def _invoke(tmp_path: Path, *extra: str) -> tuple[int, str]:
    argv = [
        "proxy", "--service", "web", "--version", "v1", "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0",
        "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"), *extra,
    ]
    result = CliRunner().invoke(main, argv)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-plane", "http://127.0.0.1:8400"], "--control-plane needs --trust FILE"),
        (["--control-plane", "ftp://127.0.0.1:8400", "--trust", "{pub}"], "must start with http:// or https://"),
        (["--control-plane", "http://127.0.0.1", "--trust", "{pub}"], "give the port, from 1 to 65535"),
        (["--control-plane", "http://127.0.0.1:99999", "--trust", "{pub}"], "not a URL: Port out of range"),
        (["--control-plane", "http://127.0.0.1:8400/v1", "--trust", "{pub}"], "give only scheme, host and port"),
        (["--control-plane", "http://:8400", "--trust", "{pub}"], "has no host"),
        (["--control-plane", "http://127.0.0.1:8400", "--trust", "{key}"],
         "not a PEM SubjectPublicKeyInfo public key (this looks like a private key: pass the .pub file)"),
        (["--control-plane", "http://127.0.0.1:8400", "--trust", "{junk}"], "junk.pub: not a PEM SubjectPublicKeyInfo"),
        (["--control-plane", "http://127.0.0.1:8400", "--trust", "{missing}"], "missing.pub: cannot read key file"),
        (["--control-plane", "http://127.0.0.1:8400", "--trust", "{pub}", "--endpoints", "{pub}"],
         "--endpoints goes with --bundle"),
        (["--control-plane", "http://127.0.0.1:8400", "--trust", "{pub}", "--ca-cert", "ca.crt"],
         "with --ca-cert the control plane is reached over https://"),
        (["--control-plane", "http://127.0.0.1:8400", "--trust", "{pub}", "--join-token", "t"],
         "--join-token goes with --ca-cert FILE"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, extra: list[str], message: str) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    names = {"pub": str(pub_path), "key": str(key_path), "junk": str(tmp_path / "junk.pub"),
             "missing": str(tmp_path / "missing.pub")}
    code, output = _invoke(tmp_path, *(arg.format(**names) for arg in extra))
    assert code == 2, output
    assert output.startswith("starmesh: error: ") and message in output, output
    if "{key}" in extra or "{junk}" in extra:
        assert names[extra[-1][1:-1]] in output  # the file is named


# -- start-up and restarts ------------------------------------------------------------------


def test_not_ready_without_last_known_good_or_control_plane_then_ready_once_one_answers(
    tmp_path: Path, planes: Callable[..., Any], bundles: Any, start_proxy: Callable[..., Any], rt: Any
) -> None:
    url = rt.dead_url()
    key = PrivateKey.generate()
    proxy = start_proxy([url], [rt.trust_file(tmp_path, key)])
    assert proxy.printed[0] == CONTROL_PLANE_PLAINTEXT_NOTICE
    state = tmp_path / "state"
    assert proxy.status == (
        f"not ready: no config yet: no last-known-good in {state}; "
        f"waiting for a release from the control plane at {url}"
    )
    readyz = proxy.http("admin", "/readyz")
    assert readyz.status == 503 and readyz.body.decode().startswith("not ready: no config yet: no last-known-good")
    answer = proxy.http("outbound", "/", {"Host": "api"})
    assert (answer.status, answer.error) == (503, "not-ready")
    shown = proxy.wait_config(lambda c: c["control_plane"]["connected"] is False, "not connected")
    assert shown["control_plane"]["url"] == url and shown["origin"] is None
    assert proxy.stop() == 0

    # A control plane with nothing to give yet: still not ready; a release: ready.
    plane = planes(key=key)
    proxy = start_proxy([plane.url], [rt.trust_file(tmp_path, key)])
    assert proxy.status.startswith("not ready: no config yet")
    plane.wait_for(lambda: plane.heartbeats, "a heartbeat")
    assert proxy.http("admin", "/readyz").status == 503
    published = plane.publish(bundles.v1)
    assert proxy.next_line(lambda line: line.startswith("applied release "), "the apply") == (
        f"applied release 1 {published.digest}"
    )
    assert proxy.http("admin", "/readyz").status == 200
    assert proxy.http("outbound", "/", {"Host": "nope"}).error == "no-route"
    assert proxy.stop() == 0


def test_restart_from_last_known_good_with_the_control_plane_down_and_a_replay_after_it(
    tmp_path: Path, planes: Callable[..., Any], bundles: Any, start_proxy: Callable[..., Any], rt: Any
) -> None:
    plane = planes()
    trust = rt.trust_file(tmp_path, plane.key)
    first, second = plane.publish(bundles.v1), plane.publish(bundles.v2)
    proxy = start_proxy([plane.url], [trust])
    proxy.next_line(lambda line: line == f"applied release 2 {second.digest}", "release 2")
    plane.wait_for(lambda: [r for r in plane.reports_of() if r["version"] == 2], "the ACK")
    assert proxy.stop() == 0
    proxy_id = (tmp_path / "state" / "proxy-id").read_text().strip()
    assert {who for who, _ in plane.heartbeats} == {proxy_id}

    # The control plane is down: the proxy serves release 2 from disk.
    proxy = start_proxy([rt.dead_url()], [trust])
    assert proxy.status == f"ready {second.digest}"
    shown = proxy.config()
    assert (shown["origin"], shown["release_version"], shown["bundle"]) == ("last-known-good", 2, second.digest)
    assert shown["control_plane"]["proxy_id"] == proxy_id
    assert proxy.http("outbound", "/", {"Host": "nope"}).error == "no-route"
    assert proxy.stop() == 0

    # A control plane (same key) that replays release 1: refused, also after the restart.
    replayer = planes(key=plane.key)
    replayer.offer(1, first.envelope, always=True)
    proxy = start_proxy([replayer.url], [trust])
    assert proxy.status == f"ready {second.digest}"
    nack = replayer.wait_for(lambda: [r for r in replayer.reports_of() if r["error"]], "a NACK")[0]
    assert nack["version"] == 1 and "release version 1 is older than the applied version 2" in nack["error"]
    shown = proxy.wait_config(lambda c: c["last_error"] is not None, "the NACK reason")
    assert "older than the applied version 2" in shown["last_error"]["error"]
    assert (shown["release_version"], shown["bundle"]) == (2, second.digest)
    assert {who for who, _ in replayer.heartbeats} == {proxy_id}
    assert proxy.stop() == 0


def test_a_corrupt_newest_generation_falls_back_to_the_previous(
    tmp_path: Path, planes: Callable[..., Any], bundles: Any, start_proxy: Callable[..., Any], rt: Any
) -> None:
    plane = planes()
    trust = rt.trust_file(tmp_path, plane.key)
    first = plane.publish(bundles.v1)
    proxy = start_proxy([plane.url], [trust])
    proxy.next_line(lambda line: line == f"applied release 1 {first.digest}", "release 1")
    second = plane.publish(bundles.v2)
    proxy.next_line(lambda line: line == f"applied release 2 {second.digest}", "release 2")
    assert proxy.stop() == 0
    state = tmp_path / "state"
    (state / "bundles" / (second.digest.replace(":", "-") + ".json")).write_bytes(bundles.v1[:-1])

    proxy = start_proxy([rt.dead_url()], [trust])
    assert proxy.status == f"ready {first.digest}"
    shown = proxy.config()
    assert (shown["origin"], shown["release_version"]) == ("last-known-good", 1)
    assert proxy.stop() == 0
    assert "corrupt: its bytes hash to" in proxy.log.read_text()

    # Back online, the control plane's newest is release 2 again (the high-water mark):
    # the same release is no replay, so it is applied again.
    proxy = start_proxy([plane.url], [trust])
    assert proxy.status == f"ready {first.digest}"
    assert proxy.next_line(lambda line: line.startswith("applied release "), "the re-apply") == (
        f"applied release 2 {second.digest}"
    )
    assert proxy.stop() == 0


@pytest.mark.parametrize("why", ["bundle-form", "untrusted-key"])
def test_last_known_good_that_does_not_verify_is_not_applied(
    tmp_path: Path, planes: Callable[..., Any], bundles: Any, start_proxy: Callable[..., Any], rt: Any,
    proxies: Any, why: str,
) -> None:
    state = tmp_path / "state"
    if why == "bundle-form":  # the --bundle form leaves last-known-good behind, without a release
        bundle = rt.write(tmp_path / "bundle.json", bundles.v1)
        local = proxies.start(bundle=bundle, state=state)
        assert local.status.startswith("ready "), local.status
        assert local.stop() == 0
        expected = "has no signed release (it came from a --bundle file)"
    else:
        plane = planes()
        plane.publish(bundles.v1)
        proxy = start_proxy([plane.url], [rt.trust_file(tmp_path, plane.key)])
        proxy.next_line(lambda line: line.startswith("applied release 1 "), "release 1")
        assert proxy.stop() == 0
        expected = "its release does not verify: no valid signature by a trusted key"
    assert load_state(state).generations
    proxy = start_proxy([rt.dead_url()], [rt.trust_file(tmp_path, PrivateKey.generate())])
    assert proxy.status.startswith("not ready: no config yet: last-known-good ignored: ")
    assert expected in proxy.status


# -- kill -9 while persisting ----------------------------------------------------------------


@pytest.mark.slow
def test_a_kill_9_at_any_moment_never_leaves_the_proxy_unable_to_start(
    tmp_path: Path, planes: Callable[..., Any], bundles: Any, start_proxy: Callable[..., Any], rt: Any
) -> None:
    plane = planes()
    trust = rt.trust_file(tmp_path, plane.key)
    plane.publish(bundles.v1)
    stop = threading.Event()

    def publish_forever() -> None:
        n = 0
        while not stop.wait(0.15):
            n += 1
            plane.publish(bundles.v2 if n % 2 else bundles.v1)
            plane.set_endpoints({"api": {"v1": [f"127.0.0.1:{7000 + n % 1000}"]}})

    publisher = threading.Thread(target=publish_forever, daemon=True)
    publisher.start()
    rng = random.Random(4)
    digests = {digest_of(bundles.v1), digest_of(bundles.v2)}
    try:
        for iteration in range(10):
            proxy = start_proxy([plane.url], [trust])
            proxy.next_line(lambda line: line.startswith("applied release "), "an apply")
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment: applies and persists keep coming
            proxy.process.kill()
            proxy.process.popen.wait(DEADLINE)

            restarted = start_proxy([rt.dead_url()], [trust])
            assert restarted.status.startswith("ready "), (iteration, restarted.status)
            assert restarted.status.removeprefix("ready ") in digests
            shown = restarted.config()
            assert shown["origin"] == "last-known-good", (iteration, shown)
            assert restarted.stop() == 0
            names = {p.name for p in (tmp_path / "state").iterdir()}
            assert names & set(GENERATION_FILES)
    finally:
        stop.set()
        publisher.join(DEADLINE)
