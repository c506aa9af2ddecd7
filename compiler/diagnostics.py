"""Findings: what lint, compile and the reconciler report about a policy.

Every finding says where (file:line:col, relative to the policy root), what (a stable
rule code and a message) and, where it helps, what to do (`hint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starmesh.bundle.spec import SourceLocation

__all__ = ["Finding", "Severity", "sort_findings"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One lint or compile diagnostic."""

    file: str
    line: int
    col: int
    code: str
    severity: Severity
    message: str
    hint: str | None = None

    @classmethod
    def at(
        cls,
        where: SourceLocation,
        code: str,
        severity: Severity,
        message: str,
        hint: str | None = None,
    ) -> Finding:
        return cls(where.file, where.line, where.col, code, severity, message, hint)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def concise(self) -> str:
        """`file:line:col: CODE message` (ruff's concise form)."""
        return f"{self.file}:{self.line}:{self.col}: {self.code} {self.message}"

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Findings in reading order, deduplicated."""
    return sorted(set(findings), key=lambda f: (f.file, f.line, f.col, f.code, f.message))
