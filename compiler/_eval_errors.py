"""Turning starlark's error text into findings (SM101, SM102, SM103, SM104, SM106).

starlark-pyo3 raises `StarlarkError` whose text is an optional traceback, an
`error: <message>` line, a ` --> file:line:col` line and a source snippet. A finding
keeps the first line of the message and the position; when the position is inside the
generated builtin wrappers or the shipped library, it moves to the innermost frame in
the user's files, where the user can act on it.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings

from starmesh.bundle.spec import SourceLocation
from starmesh.compiler._eval_locate import PRELUDE_FILE, Locator, parse_frames
from starmesh.compiler.builtins import builtin_names
from starmesh.compiler.diagnostics import Finding

__all__ = ["MAX_MESSAGE_CHARS", "finding_from_error", "refine_syntax_position"]

MAX_MESSAGE_CHARS = 400

_ARROW = re.compile(r"^\s*--> (?P<file>.*):(?P<line>\d+):(?P<col>\d+)\s*$")
_NOT_FOUND = re.compile(r"^Variable `(?P<name>[^`]*)` not found(?:, did you mean `(?P<guess>[^`]*)`\?)?")
_UNSERIALIZABLE = re.compile(r"`serde::serialize` not supported on type `(?P<type>[^`]*)`")


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def _split(text: str) -> tuple[str, str, tuple[str, int, int] | None]:
    """(traceback, first line of the message, position) of a starlark error text."""
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    if at is None:
        first = next((line.strip() for line in lines if line.strip()), "evaluation failed")
        return "", first, None
    position = None
    for line in lines[at + 1 :]:
        m = _ARROW.match(line)
        if m:
            position = (m["file"], int(m["line"]), int(m["col"]))
    return "\n".join(lines[:at]), lines[at][len("error: ") :].strip(), position


def _where(text: str, locator: Locator, current_file: str) -> tuple[SourceLocation, str]:
    traceback, message, position = _split(text)
    if position is not None and locator.is_user_file(position[0]):
        return SourceLocation(file=position[0], line=position[1], col=position[2]), message
    frames = parse_frames(traceback)
    if position is not None and position[0] != PRELUDE_FILE:
        message = f"{message} (at {position[0]}:{position[1]})"
    for i in range(len(frames) - 1, -1, -1):
        frame = frames[i]
        if locator.is_user_file(frame.file):
            called = frames[i + 1].function if i + 1 < len(frames) else ""
            col = locator.column(frame.file, frame.line, called) if called else 1
            return SourceLocation(file=frame.file, line=frame.line, col=col), message
    if position is not None:
        return SourceLocation(file=position[0], line=position[1], col=position[2]), _split(text)[1]
    return SourceLocation(file=current_file, line=1, col=1), message


def finding_from_error(
    text: str,
    locator: Locator,
    current_file: str,
    *,
    syntax: bool,
    time_limit: float,
    call_depth: int,
) -> Finding:
    """The finding for one starlark error; `syntax` is set for errors from parsing."""
    where, message = _where(text, locator, current_file)
    if message.startswith("StarlarkError: "):
        message = message[len("StarlarkError: ") :]
    if syntax:
        if message.startswith("Parse error: "):
            message = message[len("Parse error: ") :]
        return Finding.at(where, "SM101", "error", _clip(f"syntax error: {message}"))
    m = _NOT_FOUND.match(message)
    if m:
        return Finding.at(where, "SM102", "error", _clip(f"unknown name `{m['name']}`"), _name_hint(m["name"], m["guess"]))
    if message.startswith("Evaluation cancelled"):
        return Finding.at(
            where,
            "SM106",
            "error",
            f"policy evaluation exceeded the time limit of {time_limit:g} s",
            "look for a loop that never ends or grows too fast",
        )
    if message.startswith("Starlark call stack overflow"):
        return Finding.at(
            where,
            "SM106",
            "error",
            f"policy evaluation exceeded the call depth limit of {call_depth}",
            "look for a function that calls itself without end",
        )
    m = _UNSERIALIZABLE.search(message)
    if m:
        return Finding.at(
            where,
            "SM103",
            "error",
            f"a value of type `{m['type']}` cannot be passed to a builtin",
            "pass strings, numbers, booleans, None, lists, dicts or the results of other builtins",
        )
    if message.startswith(("Module has no symbol", "Cannot import private symbol")):
        return Finding.at(where, "SM104", "error", _clip(f"load(): {message}"), "a file exports its top-level names that do not start with _")
    return Finding.at(where, "SM103", "error", _clip(message))


def _name_hint(name: str, guess: str | None) -> str:
    if guess:
        return f"did you mean `{guess}`?"
    close = difflib.get_close_matches(name, builtin_names(), n=1)
    if close:
        return f"did you mean `{close[0]}`?"
    return "define it, load() it, or use one of the builtins listed in docs/policy-reference.md"


def refine_syntax_position(finding: Finding, text: str) -> Finding:
    """A better position for a syntax error starlark puts at 1:1 (it does so for an
    unclosed bracket at the end of a file): Python's parser, which reads Starlark's
    syntax closely enough, usually names the opening bracket."""
    if (finding.line, finding.col) != (1, 1):
        return finding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(text)
    except SyntaxError as exc:
        if exc.lineno and exc.lineno > 1:
            return Finding(finding.file, exc.lineno, exc.offset or 1, finding.code, finding.severity, finding.message, exc.msg)
    except (ValueError, RecursionError, MemoryError):
        pass
    return finding
