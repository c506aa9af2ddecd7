"""`starmesh diff --against URL`: the base is the bundle a running control plane serves.

    test ──git commit──► repo ◄──watch── starmesh control-plane (subprocess, 127.0.0.1:0;
      │                                    plain HTTP, or HTTPS with a mesh CA and join token)
      └── starmesh diff --repo repo --against URL [HEAD] (CliRunner)
            GET /v1/status ─► release's digest ─► GET /v1/bundles/<digest> (sha256 checked)

With mesh identity the bundle route is open like /v1/status (the CLI has no proxy
certificate); the proxies' other routes stay guarded, which the mTLS test checks too.
What a real control plane cannot be made to do (serve bytes that do not match their
digest, have no release, refuse the bundle) is played by an in-process aiohttp server.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.control_client import call_control_plane
from starmesh.cli.main import main
from starmesh.compiler.compile import compile_tree

TOKEN = "join-token-0123456789abcdef"

def diff(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, ["diff", *args], catch_exceptions=False)


def as_json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def start_control_plane(tmp_path: Path, control_planes: Any, repo: Path, *extra: str) -> tuple[Any, str]:
    """A control plane following `repo`, once it has released the first commit: (it, its release line)."""
    private, _ = generate_keypair(tmp_path / "keys")
    plane = control_planes.start([
        "--repo", str(repo), "--branch", "main", "--key", str(private),
        "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0", *extra,
    ], log=tmp_path / "cp.log")  # fmt: skip
    listening, ready = plane.first_lines(2)
    assert listening.startswith("listening 127.0.0.1:"), listening
    assert re.fullmatch(r"ready release 1 sha256:[0-9a-f]{64}", ready), ready
    return plane, listening.removeprefix("listening ")


def test_against_a_plain_http_control_plane(
    runner: CliRunner, tmp_path: Path, h: Any, control_planes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = h.make_repo(tmp_path / "repo")
    first = h.commit(repo, h.reviews(100, 0), "all to v1")
    plane, address = start_control_plane(tmp_path, control_planes, repo)
    plane.url = url = f"http://{address}"
    released = plane.status()["release"]
    monkeypatch.chdir(tmp_path)

    # What runs is what the work tree holds: no change.
    document = as_json(diff(runner, "--repo", "repo", "--against", url, "--format", "json"))
    assert document["base"] == {"label": f"control plane {url} (release 1)", "commit": first, "digest": released["bundle"]}
    assert document["head"]["label"] == "working tree"
    assert document["behaviour_changed"] is False
    head = as_json(diff(runner, "--repo", "repo", "--against", url + "/", "HEAD", "--format", "json"))
    assert head["head"] == {"label": f"HEAD ({first[:12]})", "commit": first, "digest": head["head"]["digest"]}
    assert head["behaviour_changed"] is False

    # An edit not yet committed: what would change against what runs.
    (repo / "mesh.star").write_text(h.reviews(50, 50), encoding="utf-8")
    changed = diff(runner, "--repo", "repo", "--against", url, "--exit-code")
    assert changed.exit_code == 1, changed.output
    assert f"base  control plane {url} (release 1)" in changed.stdout
    assert "[shifts 50% of traffic]" in changed.stdout and "repo/mesh.star:5" in changed.stdout

    # Committed and released: the control plane's base moves with it.
    h.git(repo, "commit", "-q", "-am", "half to v2")
    second = h.git(repo, "rev-parse", "HEAD")
    plane.wait_status(lambda d: d["release"]["version"] == 2, "release 2")
    now = as_json(diff(runner, "--repo", "repo", "--against", url, "--format", "json", "--exit-code"))
    assert now["base"]["label"] == f"control plane {url} (release 2)" and now["base"]["commit"] == second
    assert now["behaviour_changed"] is False
    back = as_json(diff(runner, "--repo", "repo", "--against", url, "HEAD~1", "--format", "json"))
    assert [c["kind"] for c in back["changes"]] == ["traffic.shift"]


def test_against_an_mtls_control_plane_with_its_ca_cert(
    runner: CliRunner, tmp_path: Path, h: Any, control_planes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starmesh.reconciler.ca import init_ca

    init_ca("cluster.local", tmp_path / "ca")
    ca_cert = tmp_path / "ca" / "ca.crt"
    repo = h.make_repo(tmp_path / "repo")
    first = h.commit(repo, h.reviews(100, 0), "all to v1")
    _, address = start_control_plane(tmp_path, control_planes, repo, "--ca", str(tmp_path / "ca"), "--join-token", TOKEN)
    url = f"https://{address}"
    (repo / "mesh.star").write_text(h.reviews(0, 100), encoding="utf-8")
    monkeypatch.chdir(repo)

    document = as_json(diff(runner, "--against", url, "--ca-cert", str(ca_cert), "--format", "json"))
    assert document["base"]["label"] == f"control plane {url} (release 1)" and document["base"]["commit"] == first
    assert [c["kind"] for c in document["changes"]] == ["traffic.shift"]

    # The CLI has no proxy certificate: the bundle is open to it, the proxies' routes are not.
    assert call_control_plane(url, "/v1/release?after=0&wait=0", ca_cert=ca_cert).status == 401
    assert call_control_plane(url, "/v1/endpoints?after=0&wait=0", ca_cert=ca_cert).status == 401

    untrusted = diff(runner, "--against", url)
    assert untrusted.exit_code == 2, untrusted.output
    assert untrusted.stderr.startswith(f"starmesh: error: cannot reach the control plane at {url}/v1/status: ")
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


# -- what a real control plane will not do --------------------------------------------------------


@pytest.fixture
def serve(fake_server: Callable[..., Any]) -> Callable[[dict[str, tuple[int, bytes]]], str]:
    """serve({path: (status, body)}): a fake control plane's URL; other paths are 404."""

    def start(answers: dict[str, tuple[int, bytes]]) -> str:
        async def handler(request: web.Request) -> web.Response:
            status, body = answers.get(request.path, (404, b'{"error": "not found"}'))
            return web.Response(status=status, body=body, content_type="application/json")

        url: str = fake_server(handler).url
        return url

    return start


@pytest.fixture
def compiled(tmp_path: Path, h: Any) -> Callable[[int, int], tuple[bytes, str]]:
    """compiled(v1, v2): the reviews policy with that split, compiled: (its bytes, its digest)."""

    def compile_(v1: int, v2: int) -> tuple[bytes, str]:
        root = tmp_path / f"policy-{v1}-{v2}"
        root.mkdir()
        (root / "mesh.star").write_text(h.reviews(v1, v2), encoding="utf-8")
        result = compile_tree(root)
        assert result.data is not None and result.digest is not None, result.findings
        return result.data, result.digest

    return compile_


def status_naming(digest: str | None) -> bytes:
    release = None if digest is None else {"version": 3, "bundle": digest, "commit": None}
    return json.dumps({"release": release, "last_compile": None, "proxies": []}).encode()


@pytest.fixture
def work_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, h: Any) -> Path:
    """A policy root outside Git: `--against` with the working tree needs no repository."""
    root = tmp_path / "work"
    root.mkdir()
    (root / "mesh.star").write_text(h.reviews(100, 0), encoding="utf-8")
    monkeypatch.chdir(root)
    return root


def test_a_fake_control_plane_outside_git_compares_with_the_work_tree(
    runner: CliRunner, compiled: Callable[[int, int], tuple[bytes, str]], work_tree: Path, serve: Callable[..., str]
) -> None:
    data, digest = compiled(90, 10)
    url = serve({"/v1/status": (200, status_naming(digest)), f"/v1/bundles/{digest}": (200, data)})
    document = as_json(diff(runner, "--against", url, "--format", "json"))
    assert document["base"] == {"label": f"control plane {url} (release 3)", "commit": None, "digest": digest}
    assert [c["kind"] for c in document["changes"]] == ["traffic.shift"]


def one_error_line(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"starmesh: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_bundle_that_does_not_hash_to_its_digest_is_refused(
    runner: CliRunner, compiled: Callable[[int, int], tuple[bytes, str]], work_tree: Path, serve: Callable[..., str]
) -> None:
    data, digest = compiled(90, 10)
    other, actual = compiled(10, 90)
    url = serve({"/v1/status": (200, status_naming(digest)), f"/v1/bundles/{digest}": (200, other)})
    one_error_line(
        diff(runner, "--against", url),
        f"the bundle served at {url}/v1/bundles/{digest} hashes to {actual}, not to its name: not comparing against it",
    )


def test_a_control_plane_that_cannot_be_compared_against_is_exit_2(
    runner: CliRunner, compiled: Callable[[int, int], tuple[bytes, str]], work_tree: Path, serve: Callable[..., str]
) -> None:
    _, digest = compiled(90, 10)
    empty = serve({"/v1/status": (200, status_naming(None))})
    one_error_line(diff(runner, "--against", empty), f"the control plane at {empty} has no release yet")
    guarded = serve({
        "/v1/status": (200, status_naming(digest)),
        f"/v1/bundles/{digest}": (401, b'{"error": "no client certificate was presented"}'),
    })  # fmt: skip
    one_error_line(
        diff(runner, "--against", guarded),
        f"control plane at {guarded}/v1/bundles/{digest} answered HTTP 401: no client certificate was presented",
    )
    garbage = serve({"/v1/status": (200, status_naming("sha256:nope"))})
    one_error_line(diff(runner, "--against", garbage), f"the control plane at {garbage} names 'sha256:nope' as its bundle")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    one_error_line(diff(runner, "--against", f"http://127.0.0.1:{port}"), "cannot reach the control plane at")
    one_error_line(diff(runner, "--against", "ftp://example"), "--against 'ftp://example' is not an http:// or https:// base URL")
