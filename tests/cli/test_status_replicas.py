"""`starmesh status` with control-plane replicas: the `control_plane` object, and failover.

    starmesh status --control-plane A --control-plane B ──► A (closed port, or a 503)
                                                        └─► B: an in-process aiohttp server
                                                            serving a canned /v1/status
                                                            (leader, no leader, read-only store)

The canned documents follow docs/design/issue9-interfaces.md ("service.py, api.py, cli").
The last test runs real replicas on a real etcd (tests/conftest.py's `etcd_server`,
tests/cli/conftest.py's `control_planes.replicas`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from click.testing import CliRunner, Result

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.main import main
from starmesh.cli.status_replicas import NO_LEADER, read_only_warning

DEADLINE = 30.0  # seconds; a bound on waiting for a condition, never an assertion about speed
STARMESH = Path(sys.executable).with_name("starmesh")
BUNDLE = "sha256:" + "ab" * 32


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


def replica(rid: str, role: str, seen_at: str = "2020-01-01T00:00:00.000Z") -> dict[str, Any]:
    return {"id": rid, "url": f"http://10.0.0.{rid[1]}:8443", "role": role,
            "started_at": "2019-12-31T23:00:00.000Z", "seen_at": seen_at}  # fmt: skip


def document(*, leader: bool = True, available: bool = True) -> dict[str, Any]:
    """A status as replica r2 (a follower) answers it, on a store that is up or down."""
    store = {"kind": "etcd", "available": available, "read_only": not available,
             "since": None if available else "2026-11-26T17:03:00.000Z",
             "error": None if available else "no etcd member answered", "member": "127.0.0.1:2379", "revision": 1234}  # fmt: skip
    return {
        "release": {"version": 3, "bundle": BUNDLE, "commit": "c" * 40},
        "last_compile": {"commit": "c" * 40, "ok": True, "diagnostics": []},
        "proxies": [{"id": "web-1", "service": "web", "version": "v1", "release_version": 3, "bundle": BUNDLE,
                     "state": "synced", "error": None, "last_seen_seconds_ago": 1.0}],  # fmt: skip
        "control_plane": {
            "id": "r2",
            "role": "follower",
            "leader": {"id": "r1", "url": "http://10.0.0.1:8443", "since": "2026-11-26T17:00:00.000Z"} if leader else None,
            "replicas": [
                replica("r3", "follower", seen_at="2999-01-01T00:00:00.000Z"),  # ahead of the local clock
                replica("r1", "leader" if leader else "follower"),
                replica("r2", "follower") | {"seen_seconds_ago": 2.5},  # a replica's own age wins
            ],
            "store": store,
        },
    }


def serve(fake_server: Callable[..., Any], body: dict[str, Any] | bytes, status: int = 200) -> tuple[str, list[str]]:
    """A fake replica answering every request with `body`; its URL and the paths it was asked."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return web.Response(status=status, body=data, content_type="application/json")

    return fake_server(handler).url, seen


def label(lines: list[str], name: str) -> list[str]:
    """The summary lines labelled `name`, without the label."""
    return [line[15:] for line in lines if line.startswith(f"{name:<15}")]


# -- the control_plane object -----------------------------------------------------------------


def test_status_shows_the_replica_the_leader_the_store_and_every_replica(
    runner: CliRunner, fake_server: Callable[..., Any]
) -> None:
    url, _ = serve(fake_server, document())
    result = run(runner, "status", "--control-plane", url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        f"control plane  {url}",
        "replica        r2  follower",
        "leader         r1  http://10.0.0.1:8443  since 2026-11-26T17:00:00.000Z",
        "store          etcd  available  member 127.0.0.1:2379  revision 1234",
    ]
    assert lines[4].startswith("release        3  ")
    assert not label(lines, "warning")
    header = lines.index(next(line for line in lines if line.startswith("REPLICA ")))
    assert lines[header].split() == ["REPLICA", "URL", "ROLE", "STARTED", "LAST", "SEEN"]
    rows = [line.split() for line in lines[header + 2 : header + 5]]
    assert rows[0][:4] == ["r1", "http://10.0.0.1:8443", "leader", "2019-12-31T23:00:00.000Z"]
    assert rows[0][5:] == ["ago"] and rows[0][4].endswith("d")  # days, by the local clock
    assert rows[1] == ["r2", "*", "http://10.0.0.2:8443", "follower", "2019-12-31T23:00:00.000Z", "2s", "ago"]
    assert rows[2] == ["r3", "http://10.0.0.3:8443", "follower", "2019-12-31T23:00:00.000Z", "2999-01-01T00:00:00.000Z"]
    proxies = lines.index(next(line for line in lines if line.startswith("ID ")))
    assert proxies > header + 4  # the replicas come above the proxy table


def test_no_leader_is_a_warning(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    url, _ = serve(fake_server, document(leader=False))
    result = run(runner, "status", "--control-plane", url)
    assert result.exit_code == 0, result.output  # status reports, it does not judge
    lines = result.stdout.splitlines()
    assert label(lines, "leader") == ["none"]
    assert label(lines, "warning") == [NO_LEADER]
    assert NO_LEADER == "no leader: releases are frozen, proxies keep their last release"


def test_a_read_only_store_is_a_warning(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    url, _ = serve(fake_server, document(available=False))
    result = run(runner, "status", "--control-plane", url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert label(lines, "store") == [
        "etcd  read-only since 2026-11-26T17:03:00.000Z  no etcd member answered  last member 127.0.0.1:2379  revision 1234"
    ]
    warning = "etcd is unreachable since 2026-11-26T17:03:00.000Z: the control plane is serving the last release read-only"
    assert label(lines, "warning") == [warning] == [read_only_warning("2026-11-26T17:03:00.000Z")]
    assert label(lines, "leader") == ["r1  http://10.0.0.1:8443  since 2026-11-26T17:00:00.000Z"]


def test_replicas_that_disagree_are_warnings(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    body = document()
    problem = "replica r3 signs with key ab12, this one (r2) with cd34: proxies trusting only one key will NACK releases after a failover"
    body["control_plane"]["problems"] = [problem]
    url, _ = serve(fake_server, body)
    result = run(runner, "status", "--control-plane", url)
    assert result.exit_code == 0, result.output
    assert label(result.stdout.splitlines(), "warning") == [problem]


def test_both_warnings_at_once_and_in_colour(fake_server: Callable[..., Any]) -> None:
    url, _ = serve(fake_server, document(leader=False, available=False))
    colour = CliRunner(env={"NO_COLOR": None, "FORCE_COLOR": "1", "NO_PROXY": "*", "no_proxy": "*"})
    result = run(colour, "status", "--control-plane", url)
    assert result.exit_code == 0, result.output
    assert "\x1b[1;31mwarning        no leader: releases are frozen" in result.stdout  # bold red
    assert "\x1b[1;31mwarning        etcd is unreachable since" in result.stdout


def test_json_passes_control_plane_through(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    served = document(available=False)
    url, _ = serve(fake_server, served)
    result = run(runner, "status", "--control-plane", url, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == served
    assert result.stderr == ""


def test_without_control_plane_nothing_changes(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    plain = document()
    del plain["control_plane"]
    url, _ = serve(fake_server, plain)
    lines = run(runner, "status", "--control-plane", url).stdout.splitlines()
    assert lines[0] == f"control plane  {url}" and lines[1].startswith("release        3  ")
    assert not [line for line in lines if line.startswith(("replica ", "leader ", "store ", "warning ", "REPLICA "))]


def test_an_ill_typed_control_plane_is_not_a_status(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    bad = document()
    bad["control_plane"]["replicas"] = "r1"
    url, _ = serve(fake_server, bad)
    result = run(runner, "status", "--control-plane", url)
    assert result.exit_code == 2
    assert "answered something that is not a status document" in result.stderr


# -- several --control-plane URLs ---------------------------------------------------------------


def test_a_replica_that_is_down_is_skipped(runner: CliRunner, fake_server: Callable[..., Any], h: Any) -> None:
    down = f"http://127.0.0.1:{h.closed_port()}"
    url, seen = serve(fake_server, document())
    result = run(runner, "status", "--control-plane", down, "--control-plane", url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"control plane  {url}"
    assert lines[1].startswith(f"  skipped: cannot reach the control plane at {down}/v1/status: ")
    assert lines[2] == "replica        r2  follower"
    assert seen == ["/v1/status"]

    result = run(runner, "status", "--control-plane", down, "--control-plane", url, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == document()  # stdout stays one JSON document
    assert result.stderr.startswith(f"starmesh: warning: skipped: cannot reach the control plane at {down}/v1/status: ")


def test_an_erroring_replica_is_skipped_and_the_first_that_answers_wins(
    runner: CliRunner, fake_server: Callable[..., Any]
) -> None:
    sick, sick_seen = serve(fake_server, {"error": "not ready: no release yet"}, status=503)
    good, good_seen = serve(fake_server, document())
    spare, spare_seen = serve(fake_server, document(leader=False))
    result = run(runner, "status", "--control-plane", sick, "--control-plane", good, "--control-plane", spare)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"control plane  {good}", f"  skipped: control plane at {sick}/v1/status answered HTTP 503: not ready: no release yet"]
    assert (sick_seen, good_seen, spare_seen) == (["/v1/status"], ["/v1/status"], [])


def test_when_no_replica_answers_every_reason_is_given(runner: CliRunner, fake_server: Callable[..., Any], h: Any) -> None:
    down = f"http://127.0.0.1:{h.closed_port()}"
    garbage, _ = serve(fake_server, b"<html>hello</html>")
    result = run(runner, "status", "--control-plane", down, "--control-plane", garbage)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("starmesh: error: none of the 2 --control-plane URLs answered: ")
    assert f"cannot reach the control plane at {down}/v1/status: " in message
    assert f"control plane at {garbage}/v1/status answered something that is not a status document" in message
    assert len(result.stderr.splitlines()) == 1


def test_a_malformed_url_fails_before_any_replica_is_asked(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    url, seen = serve(fake_server, document())
    for bad, message in (("127.0.0.1:7000", "is not an http:// or https:// URL with a host"),
                         ("http://127.0.0.1:7000/?x=1", "give the base URL, without a query or fragment")):  # fmt: skip
        result = run(runner, "status", "--control-plane", url, "--control-plane", bad)
        assert result.exit_code == 2
        assert f"--control-plane {bad!r}" in result.stderr and message in result.stderr
    assert seen == []


def test_watch_stays_with_the_replica_that_answered(fake_server: Callable[..., Any]) -> None:
    """A pipe, JSON: one document per refresh, all from the good replica; the sick one is asked once."""
    sick, sick_seen = serve(fake_server, {"error": "overloaded"}, status=503)
    good, good_seen = serve(fake_server, document())
    argv = [str(STARMESH), "status", "--control-plane", sick, "--control-plane", good, "--watch", "0.1", "--format", "json"]
    env = {"NO_COLOR": "1", "NO_PROXY": "*", "no_proxy": "*", "PATH": "/usr/bin:/bin"}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        end = time.monotonic() + DEADLINE
        while len(lines) < 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(lines) >= 3, lines
        child.send_signal(signal.SIGINT)
        assert child.wait(DEADLINE) == 0
        reader.join(DEADLINE)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(DEADLINE)
    assert child.stderr is not None
    errors = child.stderr.read()
    child.stdout.close()  # type: ignore[union-attr]
    child.stderr.close()
    assert all(json.loads(line) == document() for line in lines)
    assert sick_seen == ["/v1/status"] and len(good_seen) >= 3
    assert errors.count("starmesh: warning: skipped: ") == 1, errors


# -- real replicas on a real etcd --------------------------------------------------------------


def test_status_of_real_replicas(
    runner: CliRunner, tmp_path: Path, control_planes: Any, h: Any, etcd_server: Any
) -> None:
    repo = h.make_repo(tmp_path / "repo")
    h.commit(repo, 'mesh(name = "shop")\nservice(name = "web")\n', "first")
    key, _ = generate_keypair(tmp_path / "keys")
    # r1 leads; each advertises its bound --listen address (the default)
    planes = control_planes.replicas(("r1", "r2"), repo=repo, key=key, store=etcd_server.url, state=tmp_path)
    follower = planes[1]
    follower.wait_status(  # a replica's record follows its role within ttl/3
        lambda d: {r["id"]: r["role"] for r in (d.get("control_plane") or {}).get("replicas", [])} == {"r1": "leader", "r2": "follower"},
        "both replicas, r1 as leader",
    )
    down = f"http://127.0.0.1:{h.closed_port()}"

    result = run(runner, "status", "--control-plane", down, "--control-plane", follower.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"control plane  {follower.url}"
    assert label(lines, "replica") == ["r2  follower"]
    assert label(lines, "leader")[0].startswith(f"r1  {planes[0].url}  since ")
    assert label(lines, "store")[0].startswith("etcd  available  member ")
    assert not label(lines, "warning")
    rows = {line.split()[0]: line for line in lines if line.startswith(("r1 ", "r2 "))}
    assert set(rows) == {"r1", "r2"} and " leader " in rows["r1"]

    result = run(runner, "status", "--control-plane", follower.url, "--format", "json")
    control_plane = json.loads(result.stdout)["control_plane"]
    assert control_plane["id"] == "r2" and control_plane["leader"]["id"] == "r1"

    etcd_server.kill()
    follower.wait_status(lambda d: d["control_plane"]["store"]["read_only"], "a read-only store")
    lines = run(runner, "status", "--control-plane", follower.url).stdout.splitlines()
    assert [line for line in label(lines, "warning") if line.startswith("etcd is unreachable since ")], lines
