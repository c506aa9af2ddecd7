"""Where a builtin call was made: the user's frame on Starlark's call stack, and its column.

`call_stack()` gives `* file:line, in function` frames (the line where the call
expression starts, no column). The column comes from the file's own text: the first
`name(` on that line outside string literals and comments, else the line's first
non-blank character. Columns are 1-based characters, like starlark's own diagnostics.
(A line scan, not a parse of the whole file: on a 1,000-service policy Python's `ast`
cost more than the evaluation itself, and it finds the same call.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from starmesh.bundle.spec import SourceLocation
from starmesh.compiler._eval_labels import LIBRARY_PREFIX

__all__ = ["Frame", "Locator", "PRELUDE_FILE", "column_of_call", "parse_frames"]

PRELUDE_FILE = "@starmesh//<builtins>"
"""File name of the generated builtin wrappers: never a user file, never a macro."""

_FRAME = re.compile(r"^  \* (?P<file>.*):(?P<line>\d+), in (?P<function>.*)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Frame:
    """One call-stack frame: `function` is executing in `file` at `line`."""

    file: str
    line: int
    function: str


def parse_frames(traceback: str) -> list[Frame]:
    """The frames of a starlark traceback, outermost first."""
    return [Frame(m["file"], int(m["line"]), m["function"]) for m in _FRAME.finditer(traceback)]


_LITERAL_OR_COMMENT = re.compile(
    r'"""(?:\\.|[^\\])*?(?:"""|$)'
    r"|'''(?:\\.|[^\\])*?(?:'''|$)"
    r'|"(?:\\.|[^"\\])*(?:"|$)'
    r"|'(?:\\.|[^'\\])*(?:'|$)"
    r"|#.*"
)


def _code_mask(line: str) -> str:
    """`line` with string literals and a trailing comment blanked out (same length)."""
    return _LITERAL_OR_COMMENT.sub(lambda m: " " * len(m.group()), line)


def column_of_call(line: str, name: str, code: str | None = None) -> int:
    """1-based column of the call of `name` on `line`: the first `name(` outside strings and
    comments (the `(` may follow on the next line), else the first non-blank character.
    `code` is `line` already masked, when the caller has it."""
    if code is None:
        code = _code_mask(line)
    m = re.search(r"(?<![\w.])" + re.escape(name) + r"\s*(?:\(|$)", code)
    if m is None:
        m = re.search(r"(?<![\w])" + re.escape(name) + r"\s*(?:\(|$)", code)
    if m:
        return m.start() + 1
    stripped = line.lstrip()
    return len(line) - len(stripped) + 1 if stripped else 1


class Locator:
    """Attributes builtin calls to the policy: location in the user's files and the macro chain."""

    def __init__(self, files: Mapping[str, str], library: Mapping[str, str]) -> None:
        self._files = files
        self._library = library
        self._lines: dict[str, list[str]] = {}
        self._columns: dict[tuple[str, int, str], int] = {}
        self._masked: dict[tuple[str, int], str] = {}

    def is_user_file(self, file: str) -> bool:
        return file in self._files and not file.startswith(LIBRARY_PREFIX)

    def column(self, file: str, line: int, name: str) -> int:
        key = (file, line, name)
        col = self._columns.get(key)
        if col is None:
            col = self._columns[key] = self._column(file, line, name)
        return col

    def _column(self, file: str, line: int, name: str) -> int:
        lines = self._lines.get(file)
        if lines is None:
            text = self._files.get(file) if self.is_user_file(file) else self._library.get(file)
            lines = self._lines[file] = (text or "").splitlines()
        text = lines[line - 1] if 0 < line <= len(lines) else ""
        code = self._masked.get((file, line))
        if code is None:
            code = self._masked[(file, line)] = _code_mask(text)
        return column_of_call(text, name, code)

    def locate(self, builtin: str, frames: list[Frame], fallback: str) -> tuple[SourceLocation, tuple[str, ...]]:
        """Where `builtin` was called from and through which `@starmesh//` functions.

        The location is the innermost frame in a policy file (a macro's call is
        reported where the user called the macro); without one, the innermost library
        frame; without that, line 1 of `fallback`.
        """
        frames = [f for f in frames if f.file != PRELUDE_FILE]
        at = next((i for i in range(len(frames) - 1, -1, -1) if self.is_user_file(frames[i].file)), None)
        if at is None and frames:
            at = len(frames) - 1
            while at > 0 and frames[at - 1].file.startswith(LIBRARY_PREFIX):
                at -= 1
        if at is None:
            return SourceLocation(file=fallback, line=1, col=1), ()
        frame = frames[at]
        via = tuple(f.function for f in frames[at + 1 :] if f.file.startswith(LIBRARY_PREFIX))
        col = self.column(frame.file, frame.line, via[0] if via else builtin)
        return SourceLocation(file=frame.file, line=frame.line, col=col), via
