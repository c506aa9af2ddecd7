"""The findings `last_compile` keeps for a rejected commit: errors first, bounded, explained."""

from __future__ import annotations

from starmesh.reconciler.diagnostics import MAX_DIAGNOSTICS, capped, headline, unreadable


def finding(n: int, severity: str) -> dict[str, object]:
    return {"file": "mesh.star", "line": n, "col": 1, "code": f"SM{n}", "severity": severity, "message": f"m{n}"}


def test_errors_come_first_and_the_rest_is_cut_with_a_note() -> None:
    warnings = [finding(n, "warning") for n in range(MAX_DIAGNOSTICS + 50)]
    errors = [finding(1000 + n, "error") for n in range(3)]
    kept = capped(warnings + errors, entry="root.star", commit="0123456789abcdef" * 2)
    assert kept[:3] == errors
    assert len(kept) == MAX_DIAGNOSTICS + 1
    note = kept[-1]
    assert (note["code"], note["severity"], note["file"]) == ("truncated", "warning", "root.star")
    assert note["message"] == "53 more findings not shown"
    assert note["hint"] == "run `starmesh lint` on commit 0123456789ab to see them all"


def test_a_short_list_is_kept_whole() -> None:
    findings = [finding(1, "warning"), finding(2, "error")]
    assert capped(findings, entry="mesh.star", commit="c" * 40) == [findings[1], findings[0]]
    assert capped([], entry="mesh.star", commit="c" * 40) == []


def test_an_unreadable_tree_is_one_error_naming_where_the_entry_should_be() -> None:
    diagnostic = unreadable("no file root.star at abc", entry="root.star", subdir="/deploy/policy/")
    assert (diagnostic["code"], diagnostic["severity"], diagnostic["file"]) == ("source", "error", "root.star")
    assert diagnostic["message"] == "no file root.star at abc"
    assert "deploy/policy/root.star" in str(diagnostic["hint"])
    assert "with mesh.star to" in str(unreadable("x", entry="mesh.star", subdir="")["hint"])


def test_headline() -> None:
    assert headline(finding(7, "error")) == "mesh.star:7:1: SM7 m7"
    assert headline({}) == "None:None:None: None None"
