"""`starmesh status` and `starmesh rollback` against a real `starmesh control-plane` process.

    test ──git commit──► repo (tmp_path) ◄──watch── starmesh control-plane (subprocess,
      │                                               127.0.0.1:0, its own state dir and key)
      └── starmesh status / rollback (CliRunner) ──HTTP──┘

Proxies appear in the control plane's registry through its real proxy API (heartbeat
and ACK/NACK posts), so the status table has rows without starting proxy processes.
What a real control plane cannot be made to do (answer garbage, an HTTP error, vanish)
is played by an in-process aiohttp server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.console import make_console
from starmesh.cli.main import main
from starmesh.cli.compile import InputError
from starmesh.cli.control_client import call_control_plane
from starmesh.cli.status import StatusDocument, render_status

DEADLINE = 30.0  # seconds; a bound on waiting for a condition, never an assertion about speed

POLICY = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])
"""

BROKEN = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [rule(backends = {"v1": 80, "v2": 10})])
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None, "NO_PROXY": "*", "no_proxy": "*"})


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, list(args), catch_exceptions=False)


# -- the control plane process -------------------------------------------------------


@pytest.fixture
def control_plane(tmp_path: Path, control_planes: Any, h: Any) -> tuple[Any, Path, str]:
    """A control plane (tests/cli/conftest.py's `ControlPlane`) watching a fresh repo whose
    first commit it has released as version 1."""
    repo = h.make_repo(tmp_path / "repo")
    first = h.commit(repo, POLICY.format(v1=100, v2=0), "all to v1")
    private, public = generate_keypair(tmp_path / "keys")
    plane = control_planes.start([
        "--repo", str(repo), "--branch", "main", "--key", str(private),
        "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
    ])  # fmt: skip
    plane.wait_listening()
    plane.process.first_line(lambda line: re.fullmatch(r"ready release 1 sha256:[0-9a-f]{64}", line), "release 1", DEADLINE)
    return plane, repo, first


def register(plane: Any, proxy_id: str, version: str, release: dict[str, Any] | None, error: str | None) -> None:
    """Heartbeat as a proxy of `reviews`, then ACK `release` (or NACK it with `error`)."""
    heartbeat = {"service": "reviews", "version": version, "address": "127.0.0.1:9", "release_version": None, "bundle": None}
    assert plane.post(f"/v1/proxies/{proxy_id}", heartbeat) == 200
    if release is not None:
        report = {"version": release["version"], "bundle": release["bundle"], "error": error}
        assert plane.post(f"/v1/proxies/{proxy_id}/status", report) in (200, 204)


# -- status against the real control plane --------------------------------------------


def line(lines: list[str], label: str) -> str:
    """The summary line starting with `label`."""
    found = [text for text in lines if text.startswith(label + " ")]
    assert len(found) == 1, (label, lines)
    return found[0]


def test_status_text_and_json(runner: CliRunner, control_plane: tuple[Any, Path, str]) -> None:
    plane, repo, first = control_plane
    release = plane.status()["release"]
    register(plane, "reviews-a", "v1", release, None)
    register(plane, "reviews-b", "v2", release, "golden request 'all-to-v1' failed: got v2")
    plane.wait_status(
        lambda d: {p["id"]: p["state"] for p in d["proxies"]} == {"reviews-a": "synced", "reviews-b": "failed"},
        "one synced and one failed proxy",
    )

    result = run(runner, "status", "--control-plane", plane.url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    short = release["bundle"][: len("sha256:") + 12]
    assert lines[0] == f"control plane  {plane.url}"
    assert line(lines, "following") == f"following      {repo} branch main  (idle)"
    assert line(lines, "release") == f"release        1  bundle {short}  commit {first[:12]}"
    assert line(lines, "last compile") == f"last compile   {first[:12]}  ok"
    assert "proxies        2: 1 failed, 1 synced" in lines
    header = next(line for line in lines if line.startswith("ID "))
    assert header.split() == ["ID", "SERVICE", "VERSION", "RELEASE", "BUNDLE", "STATE", "BEHIND", "REQ/S", "ERROR",
                              "LAST", "SEEN"]  # fmt: skip
    rows = {line.split()[0]: line for line in lines if line.startswith("reviews-")}
    assert rows["reviews-a"].split()[:9] == ["reviews-a", "reviews", "v1", "1", short, "synced", "0", "-", "-"]
    assert rows["reviews-b"].split()[:8] == ["reviews-b", "reviews", "v2", "-", "-", "failed", "-", "-"]
    assert "golden request 'all-to-v1' failed: got v2" in rows["reviews-b"]
    assert rows["reviews-a"].endswith(" ago")

    result = run(runner, "status", "--control-plane", plane.url + "/", "--format", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert result.output == json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    assert document["release"]["version"] == 1 and document["release"]["bundle"] == release["bundle"]
    assert document["last_compile"]["ok"] is True and document["last_compile"]["commit"] == first
    assert sorted(p["id"] for p in document["proxies"]) == ["reviews-a", "reviews-b"]


def test_status_shows_why_a_commit_was_refused(
    runner: CliRunner, control_plane: tuple[Any, Path, str], h: Any
) -> None:
    plane, repo, first = control_plane
    bad = h.commit(repo, BROKEN, "weights sum to 90")
    plane.wait_status(lambda d: (d["last_compile"] or {}).get("commit") == bad, "the bad commit compiled")

    result = run(runner, "status", "--control-plane", plane.url)
    assert result.exit_code == 0, result.output  # status reports; it does not judge
    lines = result.output.splitlines()
    assert line(lines, "release").startswith("release        1  ")
    assert line(lines, "release").endswith(f"commit {first[:12]}")
    assert line(lines, "last compile").startswith(f"last compile   {bad[:12]}  failed, not released (")
    assert any(re.fullmatch(r"  mesh\.star:5:\d+: SM206 .*weights sum to 90.*", line) for line in lines), lines


# -- rollback against the real control plane -----------------------------------------


def test_rollback_serves_an_older_bundle_as_a_new_version(
    runner: CliRunner, control_plane: tuple[Any, Path, str], tmp_path: Path, h: Any
) -> None:
    plane, repo, _ = control_plane
    old = plane.status()["release"]["bundle"]
    h.commit(repo, POLICY.format(v1=0, v2=100), "all to v2")
    newer = plane.wait_status(lambda d: d["release"]["version"] == 2, "release 2")["release"]
    assert newer["bundle"] != old

    result = run(runner, "rollback", "--control-plane", plane.url, "--to", old)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"release 3 now serves {old}"

    status = json.loads(run(runner, "status", "--control-plane", plane.url, "--format", "json").output)
    assert status["release"]["version"] == 3 and status["release"]["bundle"] == old

    # What proxies are served is release 3 naming the old bundle, and it verifies.
    code, envelope = plane.get("/v1/release?after=2&wait=1")
    assert code == 200
    code, bundle = plane.get(f"/v1/bundles/{old}")
    assert code == 200 and "sha256:" + hashlib.sha256(bundle).hexdigest() == old
    (tmp_path / "release.json").write_bytes(envelope)
    (tmp_path / "bundle.json").write_bytes(bundle)
    verified = run(
        runner, "verify", str(tmp_path / "release.json"), "--key", str(tmp_path / "keys" / "signing.pub"),
        "--bundle", str(tmp_path / "bundle.json"),
    )  # fmt: skip
    assert verified.exit_code == 0, verified.output
    assert verified.output.splitlines()[0] == "verified: release 3 of mesh shop"


def test_rollback_to_an_unknown_digest_exits_1(runner: CliRunner, control_plane: tuple[Any, Path, str]) -> None:
    plane, _, _ = control_plane
    unknown = "sha256:" + hashlib.sha256(b"never compiled").hexdigest()
    result = run(runner, "rollback", "--control-plane", plane.url, "--to", unknown)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("starmesh: rollback refused: ")
    assert unknown in result.output
    assert plane.status()["release"]["version"] == 1  # nothing was issued


# -- bad input and unreachable control planes (exit 2) ---------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("digest", ["sha256:abc", "4f" * 32, "sha256:" + "G" * 64, "sha256:" + "AB" * 32])
def test_rollback_checks_the_digest_before_sending(runner: CliRunner, digest: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}"  # nothing listens: the check must come first
    result = run(runner, "rollback", "--control-plane", url, "--to", digest)
    assert result.exit_code == 2
    assert f"--to {digest!r} is not a bundle digest like sha256:<64 lowercase hex>" in result.output


@pytest.mark.parametrize("command", ["status", "rollback"])
def test_an_unreachable_control_plane_is_exit_2(runner: CliRunner, command: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    args = ["--to", "sha256:" + "0" * 64] if command == "rollback" else []
    result = run(runner, command, "--control-plane", url, *args)
    assert result.exit_code == 2
    assert result.output.startswith(f"starmesh: error: cannot reach the control plane at {url}/v1/")
    assert "refused" in result.output


def test_a_control_plane_url_must_be_http(runner: CliRunner) -> None:
    result = run(runner, "status", "--control-plane", "127.0.0.1:7000")
    assert result.exit_code == 2
    assert "is not an http:// or https:// URL with a host" in result.output


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (200, b"<html>hello</html>", "answered something that is not a status document"),
        (200, b'{"hello": 1}', "answered something that is not a status document"),
        (200, b'{"release": null, "last_compile": null, "proxies": [{"state": "synced"}]}',
         "answered something that is not a status document: Object missing required field `id`"),
        (503, b'{"error": "not ready: no release yet"}', "answered HTTP 503: not ready: no release yet"),
    ],
)
def test_garbage_answers_are_exit_2(
    runner: CliRunner, fake_server: Callable[..., Any], status: int, body: bytes, message: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    url = fake_server(handler).url
    for output_format in ("text", "json"):
        result = run(runner, "status", "--control-plane", url, "--format", output_format)
        assert result.exit_code == 2, result.output
        assert f"control plane at {url}/v1/status {message}" in result.output


def test_an_oversized_answer_is_cut_off(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b" " * (1 << 20)
        for _ in range(9):  # 9 MiB of whitespace: valid JSON padding, over the 8 MiB cap
            await response.write(chunk)
        await response.write_eof()
        return response

    url = fake_server(handler).url
    result = run(runner, "status", "--control-plane", url)
    assert result.exit_code == 2
    assert f"control plane at {url}/v1/status answered more than {8 << 20} bytes" in result.output


def test_a_slow_drip_answer_meets_the_deadline(fake_server: Callable[..., Any]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:  # one byte every 50 ms, forever: each read succeeds, the whole never ends
            await response.write(b" ")
            await asyncio.sleep(0.05)

    url = fake_server(handler).url
    with pytest.raises(InputError, match=r"did not finish answering within 1 s"):
        call_control_plane(url, "/v1/status", timeout=0.5)


def test_rollback_passes_on_the_control_planes_error(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.json()))
        return web.json_response({"error": "this replica is not the leader"}, status=503)

    url = fake_server(handler).url
    digest = "sha256:" + "0" * 64
    result = run(runner, "rollback", "--control-plane", url, "--to", digest)
    assert result.exit_code == 2
    assert "answered HTTP 503: this replica is not the leader" in result.output
    assert seen == [("POST", "/v1/rollback", {"to": digest})]


# -- rollback with several --control-plane URLs (replicas) ------------------------------


def release_2(plane: Any, repo: Path, h: Any) -> str:
    """Commit a second policy, wait for release 2; the bundle of release 1 (to roll back to)."""
    old: str = plane.status()["release"]["bundle"]
    h.commit(repo, POLICY.format(v1=0, v2=100), "all to v2")
    plane.wait_status(lambda d: d["release"]["version"] == 2, "release 2")
    return old


def test_rollback_skips_an_unreachable_replica(
    runner: CliRunner, control_plane: tuple[Any, Path, str], h: Any
) -> None:
    plane, repo, _ = control_plane
    old = release_2(plane, repo, h)
    down = f"http://127.0.0.1:{closed_port()}"
    result = run(runner, "rollback", "--control-plane", down, "--control-plane", plane.url, "--to", old)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"release 3 now serves {old}"
    assert result.stderr.startswith(f"starmesh: warning: skipped: cannot reach the control plane at {down}/v1/rollback: ")
    assert plane.status()["release"]["version"] == 3


def test_rollback_moves_on_from_a_503(
    runner: CliRunner, control_plane: tuple[Any, Path, str], fake_server: Callable[..., Any], h: Any
) -> None:
    plane, repo, _ = control_plane
    old = release_2(plane, repo, h)
    seen: list[Any] = []

    async def follower(request: web.Request) -> web.Response:  # a follower that cannot reach the leader
        seen.append((request.method, request.path, await request.json()))
        error = "this replica follows and cannot forward the rollback: no leader right now"
        return web.json_response({"error": error}, status=503)

    sick = fake_server(follower).url
    result = run(runner, "rollback", "--control-plane", sick, "--control-plane", plane.url, "--to", old)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"release 3 now serves {old}"
    assert result.stderr.strip() == (f"starmesh: warning: skipped: control plane at {sick}/v1/rollback answered "
                                     "HTTP 503: this replica follows and cannot forward the rollback: no leader right now")
    assert seen == [("POST", "/v1/rollback", {"to": old})]
    assert plane.status()["release"]["version"] == 3


@pytest.mark.parametrize(
    ("status", "error", "exit_code", "message"),
    [
        (404, "cannot roll back to it: no such bundle", 1, "starmesh: rollback refused: cannot roll back to it: no such bundle"),
        (400, "bad request", 2, "answered HTTP 400: bad request"),
        (500, "internal error", 2, "answered HTTP 500: internal error"),
    ],
)
def test_an_answer_other_than_503_is_final(
    runner: CliRunner, fake_server: Callable[..., Any], status: int, error: str, exit_code: int, message: str
) -> None:
    asked: list[str] = []

    async def refusing(request: web.Request) -> web.Response:
        asked.append("first")
        return web.json_response({"error": error}, status=status)

    async def issuing(request: web.Request) -> web.Response:  # would roll back, if it were asked
        asked.append("second")
        return web.json_response({"release": {"version": 9, "bundle": "sha256:" + "0" * 64}})

    first, second = fake_server(refusing).url, fake_server(issuing).url
    result = run(runner, "rollback", "--control-plane", first, "--control-plane", second, "--to", "sha256:" + "0" * 64)
    assert result.exit_code == exit_code, result.output
    assert message in result.stderr
    assert asked == ["first"]


def test_rollback_help_tells_how_replicas_are_asked(runner: CliRunner) -> None:
    shown = " ".join(run(runner, "rollback", "--help").output.split())
    assert "repeat it for each replica (asked in order until one answers)" in shown
    assert "one that cannot be reached or answers 503 (it cannot reach the leader) is skipped with a warning" in shown
    assert "any other answer is final" in shown


def test_rollback_when_no_replica_can_act_gives_every_reason(runner: CliRunner, fake_server: Callable[..., Any]) -> None:
    async def follower(request: web.Request) -> web.Response:
        return web.json_response({"error": "no leader right now"}, status=503)

    sick = fake_server(follower).url
    down = f"http://127.0.0.1:{closed_port()}"
    result = run(runner, "rollback", "--control-plane", sick, "--control-plane", down, "--to", "sha256:" + "0" * 64)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("starmesh: error: none of the 2 --control-plane URLs answered: ")
    assert f"control plane at {sick}/v1/rollback answered HTTP 503: no leader right now" in message
    assert f"cannot reach the control plane at {down}/v1/rollback: " in message


# -- the text rendering (a fixed document) ----------------------------------------------


def test_status_text_rendering(assert_snapshot: Callable[[str, str], None]) -> None:
    bundle = "sha256:" + "ab" * 32
    document = {
        "release": {"version": 7, "bundle": bundle, "commit": "0123456789abcdef" * 2 + "01234567", "reason": "rollback"},
        "last_compile": {
            "commit": "fedcba9876543210" * 2 + "fedcba98",
            "ok": False,
            "diagnostics": [
                {"file": "mesh.star", "line": 5, "col": 40, "code": "SM206", "severity": "error",
                 "message": "rule(backends): weights sum to 90, not 100", "hint": None},
                {"file": None, "line": None, "col": None, "code": "source", "severity": "error",
                 "message": "cannot read commit \x1b[31mX", "hint": None},
            ],
        },
        "reconciler": {"repo": "/srv/policy", "branch": "main", "phase": "idle", "last_result": None},
        "rollout": {
            "version": 7, "bundle": bundle, "phase": "baking", "stable": {"version": 6, "bundle": "sha256:" + "cd" * 32},
            "canary": ["reviews-a", "reviews-b"], "acked": ["reviews-a"],
            "failures": [{"proxy": "reviews-b", "reason": "golden request 'x' failed"}],
            "bake_until": "2026-11-26T09:05:00.000Z", "halted": None,
            "policy": {"canary_percent": 50, "bake_seconds": 300.0, "max_failures": 1},
        },
        "proxies": [
            {"id": "web-1", "service": "web", "version": "v1", "release_version": None, "bundle": None,
             "state": "stale", "error": None, "last_seen": "2026-11-25T07:00:00Z"},  # an older control plane's fields
            {"id": "reviews-b", "service": "reviews", "version": "v2", "release_version": 6, "bundle": "sha256:" + "cd" * 32,
             "state": "failed", "error": "golden request 'x' failed", "last_seen": "2026-11-26T08:57:00.000Z",
             "last_seen_seconds_ago": 181.5, "desired_release_version": 7, "releases_behind": 1, "request_rate": 0.0},
            {"id": "reviews-a", "service": "reviews", "version": "v1", "release_version": 7, "bundle": bundle,
             "state": "synced", "error": None, "last_seen": "2026-11-26T08:59:57.000Z",  # the server's age wins
             "last_seen_seconds_ago": 2.9, "desired_release_version": 7, "releases_behind": 0, "request_rate": 12.345},
        ],
    }  # fmt: skip
    import io

    buffer = io.StringIO()
    render_status(
        make_console(buffer, color=False),
        msgspec.convert(document, StatusDocument),
        url="http://127.0.0.1:7000",
        now=datetime(2026, 11, 26, 9, 0, 0, tzinfo=UTC),
    )
    assert_snapshot("status_text.txt", buffer.getvalue())


def test_status_text_of_a_halted_rollout() -> None:
    import io

    document = {
        "release": {"version": 9, "bundle": "sha256:" + "cd" * 32, "commit": "c" * 40, "reason": "halt"},
        "last_compile": {"commit": "d" * 40, "ok": True, "diagnostics": []},
        "rollout": {
            "version": 8, "bundle": "sha256:" + "ef" * 32, "phase": "halted", "stable": {"version": 9, "bundle": "sha256:" + "cd" * 32},
            "canary": ["a"], "acked": [], "failures": [{"proxy": "a", "reason": "bad"}], "bake_until": None,
            "halted": {"reason": "1 failure(s), more than max_failures 0: a: bad",
                       "rolled_back_to": {"version": 9, "bundle": "sha256:" + "cd" * 32}},
            "policy": {"canary_percent": 10, "bake_seconds": 0.0, "max_failures": 0},
        },
        "proxies": [],
    }  # fmt: skip
    buffer = io.StringIO()
    render_status(make_console(buffer, color=False), msgspec.convert(document, StatusDocument), url="http://x:1", now=datetime.now(UTC))
    lines = buffer.getvalue().splitlines()
    assert lines[1] == "release        9  bundle sha256:cdcdcdcdcdcd  commit cccccccccccc  (halt)"
    assert lines[3] == "rollout        halted  release 8  stable 9  acked 0  failures 1 (tolerated 0)"
    assert lines[4] == "  halted: 1 failure(s), more than max_failures 0: a: bad; rolled back as release 9 (sha256:cdcdcdcdcdcd)"
    assert lines[5] == "proxies        0"
