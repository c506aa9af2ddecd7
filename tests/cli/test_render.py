"""Rendering findings: full and concise text, JSON, GitHub annotations, paths and colour."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from starmesh.cli.console import make_console, wants_color
from starmesh.cli.render import (
    PolicyFiles,
    escape_github_data,
    escape_github_property,
    render_concise,
    render_full,
    render_github,
    render_json,
    render_summary,
    summary_line,
)
from starmesh.compiler.diagnostics import Finding

MESH = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])
http_route(
    service = "reviews",
    rules = [rule(backends = {"v1": 80, "v2": 10})],
)
"""

WEIGHTS = Finding(
    "mesh.star", 6, 30, "SM206", "error", "backend weights sum to 90, not 100", "make the weights add up to 100"
)
RETRIES = Finding("lib/x.star", 2, 5, "SM402", "warning", "retries without a timeout", None)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A policy root at tmp_path/policies, with the current directory at tmp_path."""
    root = tmp_path / "policies"
    (root / "lib").mkdir(parents=True)
    (root / "mesh.star").write_text(MESH, encoding="utf-8")
    (root / "lib" / "x.star").write_text("def f():\n    return retries(attempts = 3)\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return root


def plain(render: Callable[..., None], *args: object) -> str:
    buf = io.StringIO()
    console = make_console(buf, env={})
    render(console, *args)
    return buf.getvalue()


def files_at(root: Path, cwd: Path | None = None) -> PolicyFiles:
    return PolicyFiles(root=root, cwd=cwd or Path.cwd())


def caret_column(output: str) -> tuple[str, int]:
    """The source line shown and the 0-based column of the caret under it, relative to the line."""
    lines = output.splitlines()
    caret_at = next(i for i, line in enumerate(lines) if line.rstrip().endswith("^") and "|" in line)
    source, caret = lines[caret_at - 1], lines[caret_at]
    bar = source.index("|")
    assert caret.index("|") == bar
    return source[bar + 2 :], caret.index("^") - (bar + 2)


def test_full_form_snapshot(tree: Path, assert_snapshot: Callable[[str, str], None]) -> None:
    out = plain(render_full, [WEIGHTS, RETRIES], files_at(Path("policies")))
    assert_snapshot("render_full.txt", out)


def test_full_form_has_location_line_caret_and_help(tree: Path) -> None:
    out = plain(render_full, [WEIGHTS], files_at(Path("policies")))
    assert out.splitlines()[0] == "policies/mesh.star:6:30: SM206 error: backend weights sum to 90, not 100"
    source, col = caret_column(out)
    assert source == '    rules = [rule(backends = {"v1": 80, "v2": 10})],'
    assert source[col:].startswith("{")
    assert "help: make the weights add up to 100" in out.splitlines()


def test_concise_form_snapshot(tree: Path, assert_snapshot: Callable[[str, str], None]) -> None:
    out = plain(render_concise, [WEIGHTS, RETRIES], files_at(Path("policies")))
    assert out.splitlines()[0] == "policies/mesh.star:6:30: SM206 backend weights sum to 90, not 100"
    assert_snapshot("render_concise.txt", out)


def test_github_form_snapshot(tree: Path, assert_snapshot: Callable[[str, str], None]) -> None:
    out = "\n".join(render_github([WEIGHTS, RETRIES], files_at(Path("policies")))) + "\n"
    assert out.splitlines()[1] == "::warning file=policies/lib/x.star,line=2,col=5,title=SM402::retries without a timeout"
    assert_snapshot("render_github.txt", out)


def test_json_form(tree: Path) -> None:
    document = json.loads(render_json([WEIGHTS, RETRIES]))
    assert document == {
        "findings": [
            {
                "file": "mesh.star",
                "line": 6,
                "col": 30,
                "code": "SM206",
                "severity": "error",
                "message": "backend weights sum to 90, not 100",
                "hint": "make the weights add up to 100",
            },
            {
                "file": "lib/x.star",
                "line": 2,
                "col": 5,
                "code": "SM402",
                "severity": "warning",
                "message": "retries without a timeout",
                "hint": None,
            },
        ],
        "errors": 1,
        "warnings": 1,
    }
    assert json.loads(render_json([])) == {"findings": [], "errors": 0, "warnings": 0}


def test_github_escaping() -> None:
    assert escape_github_data("50% of\r\nrequests: a,b") == "50%25 of%0D%0Arequests: a,b"
    assert escape_github_property("a:b,c%d\ne") == "a%3Ab%2Cc%25d%0Ae"
    finding = Finding("we,ird:name.star", 1, 1, "SM101", "error", "bad\nthing 100%", None)
    (line,) = render_github([finding], PolicyFiles(root=Path("."), cwd=Path.cwd()))
    assert line == "::error file=we%2Cird%3Aname.star,line=1,col=1,title=SM101::bad%0Athing 100%25"


@pytest.mark.parametrize(
    ("line", "col", "expected_caret"),
    [
        ("\tx = 1", 2, 4),  # a tab is shown as four spaces, the caret follows it
        ("名前 = 1", 4, 5),  # two wide characters and a space take five cells
        ("abc", 99, 3),  # past the end: at the end of the line
        ("abc", 0, 0),  # before the start: at the start
        ("", 1, 0),
    ],
)
def test_caret_placement(tmp_path: Path, line: str, col: int, expected_caret: int) -> None:
    (tmp_path / "mesh.star").write_text(line + "\n", encoding="utf-8")
    finding = Finding("mesh.star", 1, col, "SM101", "error", "m", None)
    out = plain(render_full, [finding], PolicyFiles(root=tmp_path, cwd=tmp_path))
    _, caret = caret_column(out)
    assert caret == expected_caret


@pytest.mark.parametrize("line", [0, -1, 3, 1000])
def test_line_out_of_range_shows_no_snippet(tmp_path: Path, line: int) -> None:
    (tmp_path / "mesh.star").write_text("a = 1\n", encoding="utf-8")
    finding = Finding("mesh.star", line, 1, "SM101", "error", "m", "do this")
    out = plain(render_full, [finding], PolicyFiles(root=tmp_path, cwd=tmp_path))
    assert out == f"mesh.star:{line}:1: SM101 error: m\nhelp: do this\n\n"


def test_line_after_final_newline_is_shown_empty(tmp_path: Path) -> None:
    (tmp_path / "mesh.star").write_text("a = (\n", encoding="utf-8")
    finding = Finding("mesh.star", 2, 1, "SM101", "error", "unexpected end of file", None)
    out = plain(render_full, [finding], PolicyFiles(root=tmp_path, cwd=tmp_path))
    assert out.splitlines()[2:4] == ["2 |", "  | ^"]


def test_missing_file_and_library_label_show_no_snippet(tmp_path: Path) -> None:
    missing = Finding("gone.star", 1, 1, "SM104", "error", "m", None)
    library = Finding("@starmesh//traffic.star", 1, 1, "SM103", "error", "m", None)
    escaping = Finding("../outside.star", 1, 1, "SM104", "error", "m", None)
    (tmp_path / "outside.star").write_text("secret\n", encoding="utf-8")
    root = tmp_path / "root"
    root.mkdir()
    out = plain(render_full, [missing, library, escaping], PolicyFiles(root=root, cwd=root))
    assert "|" not in out
    assert "secret" not in out
    assert "@starmesh//traffic.star:1:1: SM103 error: m" in out


def test_compiled_text_is_preferred_over_disk(tmp_path: Path) -> None:
    (tmp_path / "mesh.star").write_text("on disk\n", encoding="utf-8")
    finding = Finding("mesh.star", 1, 1, "SM101", "error", "m", None)
    files = PolicyFiles(root=tmp_path, cwd=tmp_path, texts={"mesh.star": "as compiled\n"})
    out = plain(render_full, [finding], files)
    assert "1 | as compiled" in out
    assert "on disk" not in out


def test_control_characters_are_not_sent_to_the_terminal(tmp_path: Path) -> None:
    (tmp_path / "mesh.star").write_text('x = "\x1b[2J"\n', encoding="utf-8")
    finding = Finding("mesh.star", 1, 1, "SM103", "error", "bad \x1b]0;title\x07 value", "\x1b[31m")
    out = plain(render_full, [finding], PolicyFiles(root=tmp_path, cwd=tmp_path))
    assert "\x1b" not in out and "\x07" not in out


def test_long_lines_are_not_wrapped(tmp_path: Path) -> None:
    message = "word " * 100
    finding = Finding("mesh.star", 1, 1, "SM103", "error", message.strip(), None)
    out = plain(render_concise, [finding], PolicyFiles(root=tmp_path, cwd=tmp_path))
    assert out.count("\n") == 1


def test_shown_paths(tmp_path: Path) -> None:
    root = tmp_path / "repo" / "policies"
    root.mkdir(parents=True)
    # The root is the current directory: paths as in the finding.
    assert PolicyFiles(root=Path("."), cwd=root).shown("lib/x.star") == "lib/x.star"
    assert PolicyFiles(root=root, cwd=root).shown("mesh.star") == "mesh.star"
    # The root is under the current directory (given absolute or relative): relative to it.
    assert PolicyFiles(root=root, cwd=tmp_path).shown("mesh.star") == "repo/policies/mesh.star"
    assert PolicyFiles(root=Path("repo/policies/"), cwd=tmp_path).shown("mesh.star") == "repo/policies/mesh.star"
    # Outside the current directory: the root as given.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert PolicyFiles(root=root, cwd=elsewhere).shown("mesh.star") == f"{root.as_posix()}/mesh.star"
    assert PolicyFiles(root=Path("../repo/policies"), cwd=elsewhere).shown("a.star") == "../repo/policies/a.star"
    # The shipped library by its label.
    assert PolicyFiles(root=root, cwd=tmp_path).shown("@starmesh//canary.star") == "@starmesh//canary.star"


def test_summary_line() -> None:
    assert summary_line(0, 0) == "All checks passed."
    assert summary_line(1, 0) == "Found 1 error and 0 warnings."
    assert summary_line(2, 1) == "Found 2 errors and 1 warning."
    assert plain(render_summary, 0, 3) == "Found 0 errors and 3 warnings.\n"


def test_colour_only_when_asked(tmp_path: Path) -> None:
    files = PolicyFiles(root=tmp_path, cwd=tmp_path)
    styled = io.StringIO()
    render_concise(make_console(styled, color=True), [WEIGHTS], files)
    assert "\x1b[" in styled.getvalue()
    assert ":6:30:" in styled.getvalue()
    unstyled = io.StringIO()
    render_concise(make_console(unstyled), [WEIGHTS], files)  # a StringIO is not a terminal
    assert "\x1b" not in unstyled.getvalue()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wants_color() -> None:
    assert wants_color(_Tty(), env={}) is True
    assert wants_color(_Tty(), env={"NO_COLOR": "1"}) is False
    assert wants_color(_Tty(), env={"NO_COLOR": ""}) is True  # no-color.org: set and non-empty
    assert wants_color(io.StringIO(), env={}) is False
    assert wants_color(io.StringIO(), env={"FORCE_COLOR": "1"}) is True
    tty = _Tty()
    render_summary(make_console(tty, env={"NO_COLOR": "1"}), 1, 0)
    assert tty.getvalue() == "Found 1 error and 0 warnings.\n"
