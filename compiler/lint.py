"""Lint a built Spec: references across objects (SM303, SM304) and risky configurations
(SM4xx). The rules themselves live in `starmesh.compiler.rules`, one family per module.

    spec --LintContext--> every rule in RULES --> findings, sorted by location then code
"""

from __future__ import annotations

from starmesh.bundle.spec import Spec
from starmesh.compiler.diagnostics import Finding, sort_findings
from starmesh.compiler.rules import RULES, LintContext

__all__ = ["lint_spec"]


def lint_spec(spec: Spec) -> list[Finding]:
    """Every Spec-level finding, deterministic: sorted by file, line, col, then code."""
    ctx = LintContext(spec)
    findings: list[Finding] = []
    for rule in RULES.values():
        findings.extend(rule(ctx))
    return sort_findings(findings)
