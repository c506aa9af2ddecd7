"""The compiler package's exceptions.

    CompilerError               anything that stops a policy from compiling
     ├── SourceError            the policy tree can't be read (missing root or entry, bad path,
     │                          unknown revision, a symlink escaping the root, too big)
     └── EvaluationError        the Starlark failed to evaluate; `.findings` say where and why
"""

from __future__ import annotations

from starmesh.compiler.diagnostics import Finding

__all__ = ["CompilerError", "EvaluationError", "SourceError"]


class CompilerError(Exception):
    """A policy could not be compiled; the message says what and where."""


class SourceError(CompilerError):
    """The policy tree could not be read: the message names the path or revision and the fix."""


class EvaluationError(CompilerError):
    """Evaluating the policy's Starlark failed; each finding carries file:line:col and a code."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        first = self.findings[0].concise() if self.findings else "policy evaluation failed"
        more = len(self.findings) - 1
        super().__init__(first if more <= 0 else f"{first} (and {more} more)")
