"""`starmesh control-plane`: its input checks (exit 2) and the real process.

The process test starts `.venv/bin/starmesh control-plane` in its own session (the
`control_planes` fixture of tests/cli/conftest.py), reads `listening HOST:PORT` and
`ready ...` from its stdout, talks HTTP to it, commits to the repository it follows, and
stops it with SIGTERM (exit 0); the fixture stops whatever is left. Waits poll with a
deadline; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.control_plane import parse_ttl
from starmesh.cli.main import main

DEADLINE = 30.0

POLICY = """\
mesh(name = "shop", mtls = "disable")
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{to}": 100}})])
request_test(name = "default route", service = "api", backends = "{to}")
"""


@pytest.fixture
def repo(tmp_path: Path, h: Any) -> Path:
    return h.make_repo(tmp_path / "policy")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    private, _ = generate_keypair(tmp_path / "keys")
    return private


# -- input checks ----------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner(env={"NO_COLOR": "1"}).invoke(main, ["control-plane", *args])


def base(repo: Path, key: Path, state: Path) -> list[str]:
    return ["--repo", str(repo), "--key", str(key), "--state-dir", str(state), "--listen", "127.0.0.1:0"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ca", "ca"], "--ca comes with the security issue (5)"),
        (["--join-token", "t"], "--join-token comes with the security issue (5)"),
        (["--store", "etcd://127.0.0.1:2379"], "--store comes with the high-availability issue (9)"),
        (["--listen", "localhost"], "--listen: 'localhost' is not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "--listen: '127.0.0.1:99999': port 99999"),
        (["--branch", "a..b"], "--branch: 'a..b' is not a valid branch name"),
        (["--release-ttl", "7 days"], "--release-ttl: '7 days' is not a duration like 7d"),
        (["--release-ttl", "1s"], "--release-ttl: '1s' is outside 10s..365d"),
        (["--subdir", "../elsewhere"], "--subdir '../elsewhere' must be a path inside the repository"),
        (["--entry", "/etc/mesh.star"], "--entry '/etc/mesh.star' must be a path inside the repository"),
        (["--repo", "gopher://x/y"], "--repo gopher://x/y: unsupported URL scheme 'gopher'"),
    ],
)
def test_bad_options_exit_2_saying_why(tmp_path: Path, repo: Path, key: Path, extra: list[str], message: str) -> None:
    result = invoke(*base(repo, key, tmp_path / "state"), *extra)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"starmesh: error: {message}"), result.stderr


def test_a_missing_or_bad_key_exits_2(tmp_path: Path, repo: Path) -> None:
    missing = invoke(*base(repo, tmp_path / "nope.key", tmp_path / "state"))
    assert missing.exit_code == 2
    assert "--key" in missing.stderr and "no such file" in missing.stderr and "starmesh keygen" in missing.stderr
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    bad = invoke(*base(repo, garbage, tmp_path / "state"))
    assert bad.exit_code == 2
    assert "not a PEM PKCS#8 private key" in bad.stderr
    _, public = generate_keypair(tmp_path / "other")
    wrong = invoke(*base(repo, public, tmp_path / "state"))
    assert wrong.exit_code == 2 and "--key" in wrong.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_exits_2(tmp_path: Path, repo: Path, key: Path) -> None:
    key.chmod(0)
    result = invoke(*base(repo, key, tmp_path / "state"))
    assert result.exit_code == 2 and "cannot read key file" in result.stderr


def test_a_repo_that_is_not_there_or_not_git_exits_2(tmp_path: Path, key: Path) -> None:
    missing = invoke(*base(tmp_path / "nowhere", key, tmp_path / "state"))
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    not_git = invoke(*base(plain, key, tmp_path / "state"))
    assert not_git.exit_code == 2 and "not a Git repository" in not_git.stderr


def test_a_state_dir_that_cannot_be_created_exits_2(tmp_path: Path, repo: Path, key: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way\n")
    result = invoke(*base(repo, key, blocker / "state"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"starmesh: error: --state-dir {blocker / 'state'}: cannot create it")


def test_help_names_every_option_and_shows_an_example() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--repo", "--branch", "--key", "--state-dir", "--listen", "--subdir", "--entry",
                   "--poll-interval", "--proxy-ttl", "--release-ttl", "--ca", "--join-token", "--store"):
        assert option in result.stdout
    assert "Example:" in result.stdout and "starmesh control-plane --repo" in result.stdout


@pytest.mark.parametrize(
    ("text", "ttl"),
    [("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)), ("90s", timedelta(seconds=90))],
)
def test_release_ttl_durations(text: str, ttl: timedelta) -> None:
    assert parse_ttl(text) == ttl


# -- the process -----------------------------------------------------------------------------


def test_the_process_serves_releases_follows_commits_and_stops_on_sigterm(
    tmp_path: Path, repo: Path, key: Path, control_planes: Any, h: Any
) -> None:
    first = h.commit(repo, POLICY.format(to="v1"))
    cp = control_planes.start(base(repo, key, tmp_path / "state") + ["--poll-interval", "3600"], log=tmp_path / "cp.log")
    listening, ready = cp.first_lines(2)
    assert listening.startswith("listening 127.0.0.1:")
    assert cp.wait_listening() == listening.removeprefix("listening ")
    assert ready.startswith("ready release 1 sha256:"), ready
    assert cp.get("/healthz")[0] == 200 and cp.get("/readyz")[0] == 200
    body = cp.status()
    assert body["release"]["version"] == 1 and body["release"]["commit"] == first
    code, envelope = cp.get("/v1/release?after=0")
    assert code == 200 and json.loads(envelope)["payloadType"] == "application/vnd.starmesh.release+json"
    second = h.commit(repo, POLICY.format(to="v2"))
    cp.wait_status(lambda d: d["release"]["commit"] == second, f"a release of {second}")
    assert cp.status()["release"]["version"] == 2
    cp.process.send_signal(signal.SIGTERM)
    assert cp.process.popen.wait(DEADLINE) == 0
    assert (tmp_path / "state" / "store").is_dir()


def test_the_process_says_not_ready_and_stops_on_sigint(
    tmp_path: Path, repo: Path, key: Path, control_planes: Any, h: Any
) -> None:
    h.commit(repo, 'mesh(name = "shop"\n')
    cp = control_planes.start(base(repo, key, tmp_path / "state"), log=tmp_path / "cp.log")
    listening, status = cp.first_lines(2)
    assert listening.startswith("listening ")
    assert status.startswith("not ready: no release yet: commit ")
    cp.process.send_signal(signal.SIGINT)
    assert cp.process.popen.wait(DEADLINE) == 0
