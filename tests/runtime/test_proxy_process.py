"""`starmesh proxy --bundle`: real proxy processes, real upstream apps, on loopback.

Each test starts `python -m starmesh.cli proxy` with port-0 listeners, reads the bound
addresses it prints, and talks to it with plain HTTP; upstream apps are small aiohttp
servers in a background thread, each answering with its own name (the `proxies` and
`upstreams` fixtures of tests/runtime/conftest.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from starmesh.bundle.canonical import decode_bundle, digest_of
from starmesh.bundle.decide import DecisionTable, RequestInfo
from starmesh.cli.main import main

DEADLINE = 30.0  # seconds; a bound on waiting for a process, never an assertion about speed

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [
    rule(match = [match(headers = {{"x-canary": "1"}})], backends = {{"v2": 100}}),
    rule(backends = {{"{default}": 100}}),
])
request_test(name = "default goes to {default}", service = "api", backends = "{default}")
"""


@pytest.fixture
def start_proxy(proxies: Any) -> Callable[..., Any]:
    """start_proxy(bundle, app=, endpoints=): a `--bundle` form proxy (tests/runtime/conftest.py), its status read."""

    def start(bundle: Path, *, app: str = "127.0.0.1:1", endpoints: Path | None = None) -> Any:
        return proxies.start(bundle=bundle, endpoints=endpoints, app=app)

    return start


@pytest.fixture
def api(tmp_path: Path, upstreams: Any, rt: Any) -> dict[str, Any]:
    """The `api` service: two upstream versions, an endpoints file, the v1 and v2 bundles."""
    v1, v2 = upstreams.start("api-v1"), upstreams.start("api-v2")
    endpoints = rt.write(tmp_path / "endpoints.json", json.dumps({"api": {"v1": [v1], "v2": [v2]}}).encode())
    return {"endpoints": endpoints, "v1": compile_bundle(rt, tmp_path, "v1"), "v2": compile_bundle(rt, tmp_path, "v2")}


def compile_bundle(rt: Any, tmp_path: Path, default: str) -> bytes:
    return rt.compile_policy(tmp_path / f"policy-{default}", POLICY.format(default=default))


def call_api(proxy: Any, **headers: str) -> Any:
    return proxy.http("outbound", "/", {"Host": "api", **headers})


# -- tests ---------------------------------------------------------------------------


def test_ready_with_a_bundle_file(tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any) -> None:
    bundle = rt.write(tmp_path / "bundle.json", api["v1"])
    proxy = start_proxy(bundle, endpoints=api["endpoints"])
    assert proxy.printed[0] == "starmesh proxy: links are plaintext (local development: --bundle without certificates)"
    assert [line.split(" ")[0] for line in proxy.printed[1:4]] == ["outbound", "inbound", "admin"]
    assert proxy.status == f"ready {digest_of(api['v1'])}"
    assert proxy.http("admin", "/healthz").status == 200
    assert proxy.http("admin", "/readyz").status == 200
    config = proxy.config()
    assert config["release_version"] is None
    assert config["bundle"] == digest_of(api["v1"])
    assert config["origin"] == "file"
    assert config["applied_at"].endswith("Z")
    assert (config["service"], config["version"], config["last_error"]) == ("web", "v1", None)
    assert config["listeners"] == {**proxy.addresses, "app": "127.0.0.1:1"}
    assert call_api(proxy).body == b"api-v1"
    assert call_api(proxy, **{"x-canary": "1"}).body == b"api-v2"
    answer = proxy.http("outbound", "/", {"Host": "nope"})
    assert (answer.status, answer.error) == (404, "no-route")
    assert proxy.stop() == 0


def test_inbound_forwards_to_the_app(
    tmp_path: Path, api: dict[str, Any], upstreams: Any, start_proxy: Callable[..., Any], rt: Any
) -> None:
    app = upstreams.start("web-app")
    proxy = start_proxy(rt.write(tmp_path / "bundle.json", api["v1"]), app=app, endpoints=api["endpoints"])
    answer = proxy.http("inbound", "/hello")
    assert (answer.status, answer.body, answer.headers["x-upstream"]) == (200, b"web-app", "web-app")


def test_sigterm_lets_an_in_flight_request_finish(
    tmp_path: Path, upstreams: Any, start_proxy: Callable[..., Any], rt: Any
) -> None:
    arrived, release = threading.Event(), threading.Event()
    slow = upstreams.start("api-v1", hold=(arrived, release))
    endpoints = rt.write(tmp_path / "endpoints.json", json.dumps({"api": {"v1": [slow]}}).encode())
    proxy = start_proxy(rt.write(tmp_path / "bundle.json", compile_bundle(rt, tmp_path, "v1")), endpoints=endpoints)
    answers: list[tuple[int, bytes]] = []

    def call() -> None:
        answer = call_api(proxy)
        answers.append((answer.status, answer.body))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert arrived.wait(DEADLINE), "the request never reached the upstream"
        proxy.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + DEADLINE
        while "stopping: no new connections" not in proxy.log.read_text():
            assert time.monotonic() < end, "the proxy never acted on SIGTERM"
            time.sleep(0.01)
        assert proxy.process.popen.poll() is None, "the proxy exited with a request in flight"
    finally:
        release.set()
        caller.join(DEADLINE)
    assert answers == [(200, b"api-v1")]
    assert proxy.process.popen.wait(DEADLINE) == 0


def test_explain_equals_the_decision_tables_trace(
    tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any
) -> None:
    proxy = start_proxy(rt.write(tmp_path / "bundle.json", api["v1"]), endpoints=api["endpoints"])
    answer = proxy.http("admin", "/explain?service=api&path=/a%3Fb%3D1&method=PUT&source=web&header=x-canary:1")
    assert answer.status == 200
    expected = DecisionTable.build(decode_bundle(api["v1"]).spec).explain(
        RequestInfo(service="api", method="PUT", path="/a?b=1", headers=(("x-canary", "1"),), source="web")
    )
    assert json.loads(answer.body) == expected.to_json()
    answer = proxy.http("admin", "/explain?service=nope")
    assert answer.status == 404 and "unknown service 'nope'" in json.loads(answer.body)["error"]


def test_not_ready_without_a_valid_bundle_or_last_known_good(
    tmp_path: Path, start_proxy: Callable[..., Any], rt: Any
) -> None:
    bundle = rt.write(tmp_path / "bundle.json", b'{"apiVersion": "starmesh/v1"}')
    proxy = start_proxy(bundle)
    assert proxy.status.startswith(f"not ready: bundle file {bundle} not applied: bundle rejected: invalid bundle")
    assert proxy.status.endswith(f"no last-known-good in {tmp_path / 'state'}")
    readyz = proxy.http("admin", "/readyz")
    assert readyz.status == 503 and readyz.body.decode() == proxy.status + "\n"
    outbound, inbound = proxy.http("outbound", "/", {"Host": "api"}), proxy.http("inbound", "/")
    assert [(answer.status, answer.error) for answer in (outbound, inbound)] == [(503, "not-ready")] * 2
    config = proxy.config()
    assert config["bundle"] is None and "invalid bundle" in config["last_error"]["error"]
    # Counted and logged like any request: outbound to "unknown" (nothing is declared yet), inbound to web.
    metrics = proxy.http("admin", "/metrics").body.decode()
    counted = {
        (found.labels["direction"], found.labels["destination_service"]): found.value
        for family in text_string_to_metric_families(metrics)
        for found in family.samples
        if found.name == "starmesh_requests_total" and found.labels["reason"] == "not-ready"
    }
    assert counted == {("outbound", "unknown"): 1, ("inbound", "web"): 1}
    assert proxy.stop() == 0
    lines = [json.loads(line) for line in (tmp_path / "state" / "access.log").read_text().splitlines()]
    assert [(line["direction"], line["service"], line["status"], line["reason"]) for line in lines] == [
        ("outbound", "unknown", 503, "not-ready"),
        ("inbound", "web", 503, "not-ready"),
    ]


def test_golden_failing_bundle_without_last_known_good(
    tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any
) -> None:
    proxy = start_proxy(rt.write(tmp_path / "bundle.json", rt.golden_failing(api["v1"])), endpoints=api["endpoints"])
    assert "golden requests failed against the new route table" in proxy.status
    assert proxy.status.startswith("not ready: ")


def test_restart_from_last_known_good(
    tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any
) -> None:
    bundle = rt.write(tmp_path / "bundle.json", api["v2"])
    first = start_proxy(bundle, endpoints=api["endpoints"])
    assert first.stop() == 0
    state = tmp_path / "state"

    def config_files() -> list[str]:
        """The state dir without the access log (STATE_DIR/access.log by default; it grows with traffic)."""
        names = (p.relative_to(state).as_posix() for p in state.rglob("*"))
        return sorted(name for name in names if name not in ("access.log", "access.log.1"))

    files = config_files()
    assert files == ["bundles", f"bundles/{digest_of(api['v2']).replace(':', '-')}.json", "last-known-good.a.json"]

    for broken, why in ((b"not json", "bundle is not valid JSON"), (rt.golden_failing(api["v1"]), "golden requests failed")):
        rt.write(bundle, broken)
        proxy = start_proxy(bundle, endpoints=api["endpoints"])
        assert proxy.status == f"ready {digest_of(api['v2'])}"
        config = proxy.config()
        assert (config["origin"], config["bundle"]) == ("last-known-good", digest_of(api["v2"]))
        assert why in config["last_error"]["error"]
        assert call_api(proxy).body == b"api-v2"  # the endpoints came back with it
        assert proxy.stop() == 0
    assert config_files() == files  # the refused files changed nothing
    assert (state / "access.log").is_file()  # the requests above were logged, by default here


CONTROL_PLANE_FORM_ONLY = (
    "cryptography",
    "starmesh.bundle.dsse",
    "starmesh.bundle.identity",
    "starmesh.bundle.keys",
    "starmesh.bundle.release",
    "starmesh.runtime.control",
    "starmesh.runtime.control_link",
    "starmesh.runtime.workload",
)
"""Modules (and their submodules) only the control-plane and --ca-cert forms need."""


def test_the_bundle_form_never_imports_the_certificate_key_and_signature_code(
    tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle memory budget: cryptography alone is megabytes of an idle proxy's RSS."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the proxy writes every import it makes to stderr
    proxy = start_proxy(rt.write(tmp_path / "bundle.json", api["v1"]), endpoints=api["endpoints"])
    assert call_api(proxy).body == b"api-v1"
    assert proxy.http("outbound", "/", {"Host": "nope"}).error == "no-route"
    assert proxy.http("admin", "/metrics").status == 200
    assert proxy.stop() == 0
    lines = proxy.log.read_text().splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "starmesh.runtime.proxy" in imported  # the profile is on
    unexpected = {name for name in imported for only in CONTROL_PLANE_FORM_ONLY if f"{name}.".startswith(f"{only}.")}
    assert unexpected == set()


def test_a_corrupt_last_known_good_is_ignored(
    tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any
) -> None:
    bundle = rt.write(tmp_path / "bundle.json", api["v1"])
    assert start_proxy(bundle, endpoints=api["endpoints"]).stop() == 0
    stored = next((tmp_path / "state" / "bundles").iterdir())
    stored.write_bytes(stored.read_bytes().replace(b"v1", b"v2"))
    rt.write(bundle, b"{}")
    proxy = start_proxy(bundle, endpoints=api["endpoints"])
    assert proxy.status.startswith("not ready: ")
    assert "last-known-good ignored" in proxy.status and "corrupt: its bytes hash to" in proxy.status


def test_sighup_applies_a_new_file_and_keeps_the_old_table_on_a_bad_one(
    tmp_path: Path, api: dict[str, Any], start_proxy: Callable[..., Any], rt: Any
) -> None:
    bundle = rt.write(tmp_path / "bundle.json", api["v1"])
    proxy = start_proxy(bundle, endpoints=api["endpoints"])
    assert call_api(proxy).body == b"api-v1"

    rt.write(bundle, api["v2"])
    proxy.process.send_signal(signal.SIGHUP)
    config = proxy.wait_config(lambda c: c["bundle"] == digest_of(api["v2"]), "bundle v2")
    assert config["origin"] == "file" and config["last_error"] is None
    assert call_api(proxy).body == b"api-v2"

    rt.write(bundle, rt.golden_failing(api["v1"]))
    proxy.process.send_signal(signal.SIGHUP)
    config = proxy.wait_config(lambda c: c["last_error"] is not None, "the refused file")
    assert config["bundle"] == digest_of(api["v2"])
    assert config["last_error"]["bundle"] == digest_of(rt.golden_failing(api["v1"]))
    assert "golden requests failed" in config["last_error"]["error"]
    assert call_api(proxy).body == b"api-v2"

    rt.write(bundle, api["v1"])
    rt.write(api["endpoints"], b'{"api": {"v1": ["not an address"]}}')
    proxy.process.send_signal(signal.SIGHUP)
    config = proxy.wait_config(lambda c: "not an address" in (c["last_error"] or {}).get("error", ""), "the refused endpoints")
    assert config["bundle"] == digest_of(api["v2"])
    assert f"{api['endpoints']}: api/v1: 'not an address' is not HOST:PORT" in config["last_error"]["error"]
    assert proxy.stop() == 0
    log = proxy.log.read_text()
    assert "SIGHUP: the files were not applied" in log


def test_an_address_in_use_exits_2(tmp_path: Path, api: dict[str, Any], rt: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "%s:%d" % taken.getsockname()
        result = subprocess.run(
            [
                sys.executable, "-m", "starmesh.cli", "proxy", "--service", "web", "--version", "v1",
                "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0",
                "--admin", address, "--state-dir", str(tmp_path / "state"),
                "--bundle", str(rt.write(tmp_path / "bundle.json", api["v1"])),
            ],
            capture_output=True, text=True, timeout=DEADLINE,
        )
    assert result.returncode == 2, result.stderr
    assert f"starmesh: error: --admin {address}: cannot listen" in result.stderr
    assert "ready" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--outbound", "nope"], "--outbound: 'nope' is not HOST:PORT"),
        (["--app", "127.0.0.1:0"], "--app: '127.0.0.1:0': port 0 is not a number from 1 to 65535"),
        (["--admin", "127.0.0.1:70000"], "--admin: '127.0.0.1:70000': port 70000 is not a number"),
        (["--control-plane", "http://127.0.0.1:1"], "give exactly one of --bundle FILE"),
        (["--bundle", None], "give --control-plane URL (with --trust FILE), or --bundle FILE"),
        (["--ca-cert", "ca.crt"], "--ca-cert goes with --control-plane"),
        (["--join-token", "t"], "--join-token goes with --ca-cert FILE"),
        (["--trust", "signing.pub"], "--trust goes with --control-plane"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str | None], message: str, rt: Any) -> None:
    bundle = rt.write(tmp_path / "bundle.json", b"{}")
    options = {
        "--service": "web", "--version": "v1", "--app": "127.0.0.1:1", "--inbound": "127.0.0.1:0",
        "--outbound": "127.0.0.1:0", "--admin": "127.0.0.1:0", "--state-dir": str(tmp_path / "s"),
        "--bundle": str(bundle),
    }
    options[str(args[0])] = args[1]  # type: ignore[assignment]
    argv = ["proxy"] + [x for k, v in options.items() if v is not None for x in (k, v)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output
