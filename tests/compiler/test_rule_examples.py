"""Every rule code has a failing and a passing example under docs/rules/<CODE>/.

The bad tree must report the code; the good tree must not report it and must have no
errors at all (warnings of other rules are fine). The examples are inlined into
docs/policy-reference.md, so they are the documentation of each rule, too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from starmesh.compiler.codes import CODES
from starmesh.compiler.compile import compile_tree
from starmesh.compiler.diagnostics import Finding

RULES_DIR = Path(__file__).resolve().parents[2] / "docs" / "rules"


def _describe(findings: list[Finding]) -> str:
    return "\n".join(f.concise() for f in findings) or "(no findings)"


@pytest.mark.parametrize("code", sorted(CODES))
def test_bad_example_reports_the_code(code: str) -> None:
    tree = RULES_DIR / code / "bad"
    assert (tree / "mesh.star").is_file(), f"missing failing example {tree}/mesh.star"
    result = compile_tree(tree)
    reported = {f.code for f in result.findings}
    assert code in reported, f"{tree} does not report {code}:\n{_describe(result.findings)}"
    severities = {f.severity for f in result.findings if f.code == code}
    assert severities == {CODES[code].severity}


@pytest.mark.parametrize("code", sorted(CODES))
def test_good_example_is_clean_of_the_code(code: str) -> None:
    tree = RULES_DIR / code / "good"
    assert (tree / "mesh.star").is_file(), f"missing passing example {tree}/mesh.star"
    result = compile_tree(tree)
    assert code not in {f.code for f in result.findings}, _describe(result.findings)
    errors = [f for f in result.findings if f.severity == "error"]
    assert not errors, f"{tree} has errors:\n{_describe(errors)}"
    assert result.bundle is not None
