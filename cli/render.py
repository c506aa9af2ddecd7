"""Rendering findings for people and machines: full and concise text, JSON, GitHub annotations.

The full text form (ruff's, rustc's):

    lib/routes.star:7:16: SM206 error: backend weights sum to 90, not 100
      |
    7 |     backends = {"v1": 80, "v2": 10},
      |                ^
      |
    help: make the weights add up to 100

The concise form is the first line without the severity (`file:line:col: CODE message`).
Text goes through a rich Console (styled only on a terminal, see `starmesh.cli.console`);
JSON and GitHub annotations are plain strings.

Paths. A Finding's `file` is relative to the policy root. Text and GitHub output show it
relative to the current directory when the policy root is inside it, otherwise prefixed
with the root as it was given on the command line; JSON keeps it relative to the root.
Files of the shipped library (`@starmesh//NAME.star`) are shown by their label.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from starmesh.compiler.diagnostics import Finding

__all__ = [
    "PolicyFiles",
    "escape_github_data",
    "escape_github_property",
    "render_concise",
    "render_full",
    "render_github",
    "render_json",
    "render_summary",
    "summary_line",
]

_TAB = "    "
_STYLE = {"error": "bold red", "warning": "bold yellow"}
_GUTTER = "bold blue"


@dataclass(frozen=True)
class PolicyFiles:
    """The policy tree the findings point into: where it is and the text of its files.

    `root` is the policy root as given on the command line; `cwd` the directory paths are
    shown relative to; `texts` the files as they were compiled (root-relative path ->
    text). A file missing from `texts` is read from disk under the root.
    """

    root: Path
    cwd: Path
    texts: Mapping[str, str] = field(default_factory=dict)

    @property
    def shown_root(self) -> str:
        """The root as shown: relative to `cwd` when inside it, else as given."""
        try:
            return self.root.resolve().relative_to(self.cwd.resolve()).as_posix()
        except (ValueError, OSError):
            return self.root.as_posix()

    def shown(self, file: str) -> str:
        """How a finding's file is shown in text and GitHub output."""
        if file.startswith("@"):
            return file
        root = self.shown_root
        return file if root == "." else f"{root.rstrip('/')}/{file}"

    def line(self, file: str, number: int) -> str | None:
        """Line `number` (1-based) of `file`, without its line ending; None if there is none."""
        text = self.texts.get(file)
        if text is None:
            text = self._read(file)
        if text is None or number < 1:
            return None
        lines = text.split("\n")
        if number > len(lines):  # the line after a final newline exists (an error "at EOF")
            return None
        return lines[number - 1].rstrip("\r")

    def _read(self, file: str) -> str | None:
        relative = PurePosixPath(file)
        if file.startswith("@") or relative.is_absolute() or ".." in relative.parts:
            return None
        try:
            return (self.root / relative).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None


def _printable(text: str) -> str:
    """`text` safe for a terminal: tabs expanded, control characters replaced."""
    text = text.replace("\t", _TAB)
    return "".join("\N{REPLACEMENT CHARACTER}" if unicodedata.category(c) == "Cc" else c for c in text)


def _location(finding: Finding, files: PolicyFiles) -> Text:
    text = Text()
    text.append(_printable(files.shown(finding.file)), style="bold")
    text.append(f":{finding.line}:{finding.col}:")
    return text


def _snippet(finding: Finding, files: PolicyFiles) -> list[Text]:
    """The gutter, the source line and a caret under the column; empty if the line is unknown."""
    source = files.line(finding.file, finding.line)
    if source is None:
        return []
    width = len(str(finding.line))
    blank = " " * width
    # The column counts characters (1-based); past the end means "at the end of the line".
    col = min(max(finding.col, 1), len(source) + 1)
    before = _printable(source[: col - 1])
    style = _STYLE[finding.severity]

    def gutter(label: str) -> Text:
        return Text(f"{label} |", style=_GUTTER)

    numbered = gutter(str(finding.line))
    if source:
        numbered.append(" " + _printable(source))
    caret = gutter(blank)
    caret.append(" " + " " * cell_len(before))
    caret.append("^", style=style)
    return [gutter(blank), numbered, caret, gutter(blank)]


def render_full(console: Console, findings: Sequence[Finding], files: PolicyFiles) -> None:
    """Each finding in the full form: location, code, severity, message, snippet, help."""
    for finding in findings:
        style = _STYLE[finding.severity]
        head = _location(finding, files)
        head.append(" ")
        head.append(finding.code, style=style)
        head.append(" ")
        head.append(f"{finding.severity}:", style=style)
        head.append(" " + _printable(finding.message))
        console.print(head)
        for line in _snippet(finding, files):
            console.print(line)
        if finding.hint:
            help_line = Text("help:", style="bold cyan")
            help_line.append(" " + _printable(finding.hint))
            console.print(help_line)
        console.print()


def render_concise(console: Console, findings: Sequence[Finding], files: PolicyFiles) -> None:
    """One `file:line:col: CODE message` line per finding (ruff's concise form)."""
    for finding in findings:
        line = _location(finding, files)
        line.append(" ")
        line.append(finding.code, style=_STYLE[finding.severity])
        line.append(" " + _printable(finding.message))
        console.print(line)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_line(errors: int, warnings: int) -> str:
    """`Found 1 error and 2 warnings.`, or `All checks passed.` when there is nothing."""
    if errors == 0 and warnings == 0:
        return "All checks passed."
    return f"Found {_count(errors, 'error')} and {_count(warnings, 'warning')}."


def render_summary(console: Console, errors: int, warnings: int) -> None:
    """The closing count line."""
    style = "bold red" if errors else "bold yellow" if warnings else "bold green"
    console.print(Text(summary_line(errors, warnings), style=style))


def render_json(findings: Sequence[Finding]) -> str:
    """`{"findings": [...], "errors": N, "warnings": N}` (DESIGN.md: Output), files root-relative."""
    document = {
        "findings": [f.to_json() for f in findings],
        "errors": sum(1 for f in findings if f.severity == "error"),
        "warnings": sum(1 for f in findings if f.severity == "warning"),
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def escape_github_data(text: str) -> str:
    """Escape a workflow command's message (`%`, CR, LF)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_github_property(text: str) -> str:
    """Escape a workflow command's property value (the message escapes plus `:` and `,`)."""
    return escape_github_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(findings: Sequence[Finding], files: PolicyFiles) -> list[str]:
    """One GitHub Actions workflow command per finding: `::error file=..,line=..,col=..,title=..::msg`."""
    return [
        f"::{f.severity} file={escape_github_property(files.shown(f.file))},line={f.line},col={f.col},"
        f"title={escape_github_property(f.code)}::{escape_github_data(f.message)}"
        for f in findings
    ]
