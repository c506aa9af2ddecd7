"""`starmesh lint` end to end: real policy trees in tmp dirs, click's runner and a real process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from starmesh.cli.console import Consoles, make_console
from starmesh.cli.main import main

CLEAN = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(
    service = "reviews",
    rules = [rule(backends = {"v1": 90, "v2": 10})],
)
"""

# The weights sum to 90: an error (SM206), reported in lib/routes.star.
BROKEN_ROUTES = """\
def route_reviews():
    http_route(
        service = "reviews",
        rules = [rule(backends = {"v1": 80, "v2": 10})],
    )
"""

BROKEN = """\
load("//lib/routes.star", "route_reviews")

mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

route_reviews()
"""

# Retries without a timeout: a warning only (SM402).
WARNING_ONLY = """\
mesh(name = "shop")

service(name = "reviews", retries = retries(attempts = 3))
"""


def make_tree(root: Path, mesh: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mesh.star").write_text(mesh, encoding="utf-8")
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None})


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "policies", BROKEN, {"lib/routes.star": BROKEN_ROUTES})


def lint(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, ["lint", *args], catch_exceptions=False)


def json_findings(runner: CliRunner, root: Path) -> list[dict[str, object]]:
    result = lint(runner, str(root), "--format", "json")
    findings: list[dict[str, object]] = json.loads(result.stdout)["findings"]
    return findings


def test_clean_tree_exits_0(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", CLEAN)
    result = lint(runner, str(root))
    assert result.exit_code == 0, result.output
    assert result.stdout == "All checks passed.\n"


def test_errors_exit_1_with_location_line_caret_and_help(
    runner: CliRunner, broken: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(broken)
    (finding,) = [f for f in json_findings(runner, broken) if f["code"] == "SM206"]
    assert finding["file"] == "lib/routes.star"
    line, col = finding["line"], finding["col"]
    assert isinstance(line, int) and isinstance(col, int)

    result = lint(runner)
    assert result.exit_code == 1
    out = result.stdout.splitlines()
    head = out.index(f"lib/routes.star:{line}:{col}: SM206 error: {finding['message']}")
    source_line = BROKEN_ROUTES.splitlines()[line - 1]
    assert out[head + 2] == f"{line} | {source_line}"
    gutter = len(str(line)) + 3
    assert out[head + 3] == " " * (gutter - 2) + "| " + " " * (col - 1) + "^"
    assert finding["hint"] and f"help: {finding['hint']}" in out
    assert out[-1].startswith("Found 1 error and ")


def test_full_output_snapshot(runner: CliRunner, broken: Path, monkeypatch: pytest.MonkeyPatch, assert_snapshot: Callable[[str, str], None]) -> None:
    monkeypatch.chdir(broken)
    result = lint(runner)
    assert result.exit_code == 1
    assert_snapshot("lint_broken_full.txt", result.stdout)


def test_concise_output(runner: CliRunner, broken: Path, monkeypatch: pytest.MonkeyPatch, assert_snapshot: Callable[[str, str], None]) -> None:
    monkeypatch.chdir(broken.parent)
    result = lint(runner, "policies", "--concise")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("policies/lib/routes.star:4:") and " SM206 " in line for line in lines)
    assert "|" not in result.stdout
    assert lines[-1].startswith("Found 1 error")
    assert_snapshot("lint_broken_concise.txt", result.stdout)


def test_warnings_pass_unless_strict(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", WARNING_ONLY)
    result = lint(runner, str(root))
    assert result.exit_code == 0, result.output
    assert " SM402 warning: " in result.stdout
    assert result.stdout.splitlines()[-1] == "Found 0 errors and 1 warning."
    assert lint(runner, str(root), "--strict").exit_code == 1
    assert lint(runner, str(root), "--strict", "--format", "json").exit_code == 1
    assert lint(runner, str(root), "--format", "github").exit_code == 0


def test_json_shape(runner: CliRunner, broken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # file stays relative to the policy root, whatever the cwd
    result = lint(runner, str(broken), "--format", "json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert set(document) == {"findings", "errors", "warnings"}
    assert document["errors"] == sum(1 for f in document["findings"] if f["severity"] == "error") >= 1
    assert document["warnings"] == sum(1 for f in document["findings"] if f["severity"] == "warning")
    for finding in document["findings"]:
        assert list(finding) == ["file", "line", "col", "code", "severity", "message", "hint"]
        assert finding["severity"] in ("error", "warning")
    assert {"file": "lib/routes.star", "code": "SM206"}.items() <= document["findings"][0].items()
    assert result.stderr == ""


def test_json_clean(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", CLEAN)
    result = lint(runner, str(root), "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"findings": [], "errors": 0, "warnings": 0}


def test_github_annotations(runner: CliRunner, broken: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(broken.parent)
    result = lint(runner, "policies", "--format", "github")
    assert result.exit_code == 1
    (line,) = [l for l in result.stdout.splitlines() if "title=SM206" in l]
    assert line.startswith("::error file=policies/lib/routes.star,line=4,col=")
    message = json_findings(runner, broken)[0]["message"]
    assert isinstance(message, str)
    assert line.endswith("::" + message.replace("%", "%25"))
    assert all(l.startswith(("::error ", "::warning ")) for l in result.stdout.splitlines())


def test_github_escapes_properties(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "a,b:c", BROKEN, {"lib/routes.star": BROKEN_ROUTES})
    monkeypatch.chdir(tmp_path)
    result = lint(runner, root.name, "--format", "github")
    assert result.exit_code == 1
    assert "::error file=a%2Cb%3Ac/lib/routes.star,line=4," in result.stdout


def test_paths_outside_cwd_are_shown_as_given(
    runner: CliRunner, broken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = lint(runner, str(broken), "--concise")
    assert f"{broken.as_posix()}/lib/routes.star:4:" in result.stdout


def test_entry_option(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", BROKEN, {"lib/routes.star": BROKEN_ROUTES, "envs/clean.star": CLEAN})
    assert lint(runner, str(root)).exit_code == 1
    assert lint(runner, str(root), "--entry", "envs/clean.star").exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/missing"], "starmesh: error: policy root {root}/missing does not exist"),
        (["{root}/mesh.star"], "starmesh: error: {root}/mesh.star is not a directory"),
        (["{root}", "--entry", "other.star"], "starmesh: error: no other.star in {root} (use --entry"),
        (["{root}", "--entry", "/etc/passwd"], "starmesh: error: --entry '/etc/passwd' must be a path inside"),
        (["{root}", "--entry", "../x.star"], "starmesh: error: --entry '../x.star' must be a path inside"),
    ],
)
def test_bad_input_exits_2_with_one_line(runner: CliRunner, tmp_path: Path, args: list[str], message: str) -> None:
    root = make_tree(tmp_path / "p", CLEAN)
    result = lint(runner, *[a.format(root=root) for a in args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message.format(root=root))
    assert result.stderr.count("\n") == 1


def test_unreadable_tree_exits_2(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starmesh.cli import compile as cli_compile
    from starmesh.compiler.errors import SourceError

    def unreadable(root: Path, entry: str) -> None:
        raise SourceError(f"cannot read {root}/lib/x.star: permission denied")

    monkeypatch.setattr(cli_compile, "compile_tree", unreadable)
    root = make_tree(tmp_path / "p", CLEAN)
    result = lint(runner, str(root))
    assert result.exit_code == 2
    assert result.stderr == f"starmesh: error: cannot read {root}/lib/x.star: permission denied\n"


def test_usage_errors_exit_2(runner: CliRunner, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "p", CLEAN)
    assert lint(runner, str(root), "--format", "xml").exit_code == 2
    assert lint(runner, str(root), "--no-such-option").exit_code == 2


def test_help(runner: CliRunner) -> None:
    result = lint(runner, "--help")
    assert result.exit_code == 0
    for text in ("Usage:", "[PATH]", "--format", "--strict", "--entry", "--concise", "Examples:", "starmesh lint"):
        assert text in result.stdout
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "lint" in top.stdout and "compile" in top.stdout


def test_injected_console_gets_colour(broken: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    consoles = Consoles(out=make_console(out, color=True), err=make_console(err, color=True))
    result = CliRunner().invoke(main, ["lint", str(broken)], obj=consoles)
    assert result.exit_code == 1
    assert "\x1b[" in out.getvalue() and "SM206" in out.getvalue()
    assert result.stdout == ""


def test_real_process(broken: Path, tmp_path: Path) -> None:
    """`python -m starmesh.cli` in a pipe: plain text, the same exit codes."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    command = [sys.executable, "-m", "starmesh.cli", "lint"]
    done = subprocess.run([*command, "policies"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "\x1b" not in done.stdout
    assert "policies/lib/routes.star:4:" in done.stdout
    assert "^" in done.stdout
    missing = subprocess.run([*command, "nope"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr == "starmesh: error: policy root nope does not exist\n"


def test_console_script(broken: Path) -> None:
    script = Path(sys.executable).with_name("starmesh")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    done = subprocess.run([str(script), "lint", str(broken), "--format", "json"], capture_output=True, timeout=60)
    assert done.returncode == 1
    assert json.loads(done.stdout)["errors"] >= 1
