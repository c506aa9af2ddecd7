"""The consoles the command line writes to, made in one place so tests can inject them.

Every command writes through a `Consoles` pair (stdout, stderr) taken from the click
context object; `starmesh.cli.main` makes the default pair from the process's real
streams when no object was passed in. A test passes its own:

    runner.invoke(main, ["lint"], obj=Consoles(out=make_console(buf, color=True), err=...))

Colour rules (no-color.org, ruff, httpie): styled output only when the stream is a
terminal and `NO_COLOR` is unset or empty; `FORCE_COLOR` (non-empty) forces it on.
Otherwise the output is plain text, byte for byte what a snapshot test compares.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console

__all__ = ["Consoles", "make_console", "wants_color"]


def wants_color(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether output to `stream` should be styled: a terminal, and no `NO_COLOR`."""
    env = os.environ if env is None else env
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def make_console(stream: TextIO, *, color: bool | None = None, env: Mapping[str, str] | None = None) -> Console:
    """A rich Console writing to `stream`.

    `color=None` decides by `wants_color`. Markup, emoji and highlighting are off (policy
    messages contain brackets and colons that must print as written) and lines are never
    wrapped, whatever the terminal width, so a diagnostic stays one grep-able line.
    """
    styled = wants_color(stream, env) if color is None else color
    return Console(
        file=stream,
        force_terminal=styled,
        no_color=not styled,
        color_system="standard" if styled else None,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,
        width=10_000 if not styled else None,
        legacy_windows=False,
    )


@dataclass(frozen=True)
class Consoles:
    """Where a command writes: results to `out` (stdout), diagnostics and errors to `err`."""

    out: Console
    err: Console

    @classmethod
    def for_process(cls) -> Consoles:
        """Consoles on the current `sys.stdout` and `sys.stderr` (click's runner swaps them)."""
        return cls(out=make_console(sys.stdout), err=make_console(sys.stderr))
