"""`starmesh compile` end to end: the digest, -o, nothing written on errors, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from starmesh.cli.compile import write_atomically
from starmesh.cli.main import main

DIGEST_LINE = re.compile(r"^sha256:[0-9a-f]{64}\n$")

CLEAN = """\
load("//lib/routes.star", "route_reviews")

mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"], timeout = "2s")

route_reviews(canary = 10)

request_test(name = "reviews-split", service = "reviews", backends = {"v1": 90, "v2": 10})
"""

ROUTES = """\
def route_reviews(canary):
    http_route(
        service = "reviews",
        rules = [rule(backends = {"v1": 100 - canary, "v2": canary})],
    )
"""

BROKEN = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [rule(backends = {"v1": 80, "v2": 10})])
"""

WARNING_ONLY = """\
mesh(name = "shop")

service(name = "reviews", retries = retries(attempts = 3))
"""


def make_tree(root: Path, mesh: str = CLEAN, files: dict[str, str] | None = None) -> Path:
    files = {"lib/routes.star": ROUTES} if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    (root / "mesh.star").write_text(mesh, encoding="utf-8")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None})


def compile_(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, ["compile", *args], catch_exceptions=False)


def listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_prints_only_the_digest_and_writes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p")
    before = listing(tmp_path)
    result = compile_(runner, str(root))
    assert result.exit_code == 0, result.output
    assert DIGEST_LINE.match(result.stdout), result.stdout
    assert result.stderr == ""
    assert listing(tmp_path) == before


def test_output_file_holds_the_bytes_named_by_the_digest(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p")
    out = tmp_path / "out" / "bundle.json"
    out.parent.mkdir()
    result = compile_(runner, str(root), "-o", str(out))
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert result.stdout == f"sha256:{hashlib.sha256(data).hexdigest()}\n"
    bundle = json.loads(data)
    assert bundle["apiVersion"] == "starmesh/v1" and bundle["kind"] == "Bundle"
    assert bundle["source"] == {"commit": None, "path": "mesh.star"}
    assert listing(out.parent) == ["bundle.json"]  # no temporary file left behind
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    # Without -o the digest is the same.
    assert compile_(runner, str(root)).stdout == result.stdout


def test_output_replaces_an_existing_file(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p")
    out = tmp_path / "bundle.json"
    out.write_bytes(b"old")
    result = compile_(runner, str(root), "--output", str(out))
    assert result.exit_code == 0
    assert out.read_bytes() != b"old"


def test_errors_write_nothing_and_exit_1(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "p", BROKEN, {})
    out = tmp_path / "bundle.json"
    monkeypatch.chdir(root)
    result = compile_(runner, "-o", str(out))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert not out.exists()
    assert listing(tmp_path) == ["p", "p/mesh.star"]
    # The full form on stderr: location, the line, a caret, the count.
    assert re.search(r"^mesh\.star:5:\d+: SM206 error: ", result.stderr, re.MULTILINE)
    assert "5 | http_route(" in result.stderr
    assert "^" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("Found 1 error")


def test_errors_leave_an_existing_output_alone(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", BROKEN, {})
    out = tmp_path / "bundle.json"
    out.write_bytes(b"previous bundle")
    assert compile_(runner, str(root), "-o", str(out)).exit_code == 1
    assert out.read_bytes() == b"previous bundle"


def test_warnings_go_to_stderr_in_concise_form(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "p", WARNING_ONLY, {})
    monkeypatch.chdir(tmp_path)
    result = compile_(runner, "p")
    assert result.exit_code == 0, result.output
    assert DIGEST_LINE.match(result.stdout)
    assert re.match(r"^p/mesh\.star:3:\d+: SM402 \S", result.stderr)
    assert "|" not in result.stderr and "warning:" not in result.stderr


def test_entry_option_names_the_source_path(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", BROKEN, {"lib/routes.star": ROUTES, "envs/prod.star": CLEAN})
    assert compile_(runner, str(root)).exit_code == 1
    out = tmp_path / "prod.json"
    result = compile_(runner, str(root), "--entry", "envs/prod.star", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_bytes())["source"]["path"] == "envs/prod.star"
    # The same entry spelled differently is the same bundle.
    again = compile_(runner, str(root), "--entry", "./envs//prod.star")
    assert again.stdout == result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/missing"], "starmesh: error: policy root {root}/missing does not exist\n"),
        (["{root}", "--entry", "nope.star"], "starmesh: error: no nope.star in {root} (use --entry to pick another entry file)\n"),
        (["{root}", "-o", "{root}/no/such/dir/b.json"], "starmesh: error: cannot write {root}/no/such/dir/b.json: directory"),
    ],
)
def test_bad_input_exits_2(runner: CliRunner, tmp_path: Path, args: list[str], message: str) -> None:
    root = make_tree(tmp_path / "p")
    result = compile_(runner, *[a.format(root=root) for a in args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message.format(root=root))


def test_same_tree_in_two_places_same_bytes(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_tree(tmp_path / "one" / "policies")
    second = tmp_path / "two" / "deeper" / "copy"
    shutil.copytree(first, second)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    monkeypatch.chdir(first)
    one = compile_(runner, ".", "-o", str(a))
    monkeypatch.chdir(tmp_path / "two")
    two = compile_(runner, "deeper/copy", "-o", str(b))
    assert one.exit_code == two.exit_code == 0
    assert one.stdout == two.stdout
    assert a.read_bytes() == b.read_bytes()


def test_real_processes_from_different_directories(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "one")
    second = tmp_path / "elsewhere" / "two"
    shutil.copytree(first, second)
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    command = [sys.executable, "-m", "starmesh.cli", "compile"]
    a = subprocess.run([*command, ".", "-o", "../a.json"], cwd=first, env=env, capture_output=True, timeout=60)
    b = subprocess.run([*command, str(second), "-o", str(tmp_path / "b.json")], cwd="/", env=env, capture_output=True, timeout=60)
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout
    assert DIGEST_LINE.match(a.stdout.decode())
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.stdout.decode().strip() == "sha256:" + hashlib.sha256((tmp_path / "b.json").read_bytes()).hexdigest()


def test_help(runner: CliRunner) -> None:
    result = compile_(runner, "--help")
    assert result.exit_code == 0
    for text in ("Usage:", "[PATH]", "-o, --output FILE", "--entry", "Examples:", "starmesh compile"):
        assert text in result.stdout


def test_write_atomically(tmp_path: Path) -> None:
    target = tmp_path / "b.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert listing(tmp_path) == ["b.json"]
