"""docs/policy-reference.md is generated from the code and must not go stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from starmesh.compiler.builtins import BUILTINS
from starmesh.compiler.codes import CODES
from starmesh.compiler.docgen import REFERENCE_PATH, library_functions, main, render_reference


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


def test_reference_on_disk_is_up_to_date(reference: str) -> None:
    assert REFERENCE_PATH.is_file(), "docs/policy-reference.md is missing: run python -m starmesh.compiler.docgen"
    assert REFERENCE_PATH.read_text(encoding="utf-8") == reference, (
        "docs/policy-reference.md is stale: run python -m starmesh.compiler.docgen and commit the result"
    )


def test_rendering_is_deterministic(reference: str) -> None:
    assert render_reference() == reference


def test_every_builtin_and_parameter_is_documented(reference: str) -> None:
    for builtin in BUILTINS.values():
        section = reference.split(f"\n### {builtin.name}\n", 1)[1].split("\n### ", 1)[0]
        assert builtin.doc in section
        if builtin.example:
            assert builtin.example in section
        for param in builtin.params:
            assert f"| `{param.name}`" in section, f"{builtin.name}({param.name}) is not in the reference"


def test_every_rule_code_has_a_section(reference: str) -> None:
    for code in CODES.values():
        assert f"\n### {code.code}\n" in reference
        assert f"**{code.severity}**: {code.title}." in reference


def test_rule_examples_are_inlined(tmp_path: Path) -> None:
    code = sorted(CODES)[0]
    (tmp_path / code / "bad" / "lib").mkdir(parents=True)
    (tmp_path / code / "bad" / "mesh.star").write_text('load("//lib/x.star", "x")\nBAD_MARKER = 1\n')
    (tmp_path / code / "bad" / "lib" / "x.star").write_text("x = 1\n")
    (tmp_path / code / "good").mkdir()
    (tmp_path / code / "good" / "mesh.star").write_text("GOOD_MARKER = 1\n")

    text = render_reference(rules_dir=tmp_path)

    section = text.split(f"\n### {code}\n", 1)[1].split("\n### ", 1)[0]
    assert "BAD_MARKER = 1" in section
    assert "`lib/x.star`" in section
    assert "GOOD_MARKER = 1" in section
    assert section.index("BAD_MARKER") < section.index("GOOD_MARKER")


def test_shipped_macros_are_documented(reference: str) -> None:
    names = {fn.name for fn in library_functions()}
    assert {"canary", "blue_green", "ab_test", "mirror_traffic", "allow_from", "standard_resilience"} <= names
    for fn in library_functions():
        assert f"\n#### {fn.name}\n" in reference
        assert fn.doc.splitlines()[0] in reference


def test_check_exits_1_when_stale_and_0_when_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "policy-reference.md"
    assert main(["--check", "--output", str(output)]) == 1
    output.write_text("old\n")
    assert main(["--check", "--output", str(output)]) == 1
    assert "stale" in capsys.readouterr().err
    assert output.read_text() == "old\n", "--check must not write"

    assert main(["--output", str(output)]) == 0
    assert main(["--check", "--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8") == render_reference()
