"""The findings `last_compile` shows for a commit: bounded, errors first.

    compile findings (as `lint --format json` prints them)
        │  errors first, then the rest, at most MAX_DIAGNOSTICS
        ▼
    CompileStatus.diagnostics ── over the cap: one `truncated` warning says how many more,
                                 and to run `starmesh lint` on the commit for them all

A commit that cannot be read at all (no entry file, a broken tree) has no findings of
its own: `unreadable` makes the one diagnostic, code `source`, that says why and what to
commit. Each diagnostic is a plain dict (file, line, col, code, severity, message,
hint), as `/v1/status` and `starmesh status` show it.
"""

from __future__ import annotations

__all__ = ["MAX_DIAGNOSTICS", "Diagnostic", "capped", "headline", "unreadable"]

Diagnostic = dict[str, object]
"""One finding as `lint --format json` prints it."""

MAX_DIAGNOSTICS = 200
"""Findings kept in `last_compile` (a note says how many more there were)."""


def unreadable(message: str, *, entry: str, subdir: str) -> Diagnostic:
    """The one diagnostic of a commit whose policy tree cannot be read (`message` says why)."""
    where = f"{subdir.strip('/')}/" if subdir.strip("/") else ""
    return {
        "file": entry,
        "line": 1,
        "col": 1,
        "code": "source",
        "severity": "error",
        "message": message,
        "hint": f"commit a policy tree with {where}{entry} to the branch (--subdir/--entry pick another)",
    }


def capped(diagnostics: list[Diagnostic], *, entry: str, commit: str) -> list[Diagnostic]:
    """Errors first, at most MAX_DIAGNOSTICS, plus a `truncated` note when some were left out."""
    errors = [d for d in diagnostics if d.get("severity") == "error"]
    kept = (errors + [d for d in diagnostics if d.get("severity") != "error"])[:MAX_DIAGNOSTICS]
    if len(diagnostics) > len(kept):
        kept.append(
            {
                "file": entry,
                "line": 1,
                "col": 1,
                "code": "truncated",
                "severity": "warning",
                "message": f"{len(diagnostics) - len(kept)} more findings not shown",
                "hint": f"run `starmesh lint` on commit {commit[:12]} to see them all",
            }
        )
    return kept


def headline(diagnostic: Diagnostic) -> str:
    """`file:line:col: code message`, for a log line."""
    d = diagnostic
    return f"{d.get('file')}:{d.get('line')}:{d.get('col')}: {d.get('code')} {d.get('message')}"
