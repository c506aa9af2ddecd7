"""compare(base, head): the whole DiffReport of two compiled policies, as DESIGN's Diff JSON.

The tests marked "semantic" need preview/semantic.py's diff (a weight change must
yield a change); the others hold whatever it reports."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from starmesh.bundle.canonical import Bundle
from starmesh.bundle.errors import BundleError
from starmesh.bundle.explain import RequestInfo
from starmesh.preview.impact import SampleRequest
from starmesh.preview.model import Side
from starmesh.preview.report import compare

POLICY = """
mesh("shop")
service("productpage")
service("reviews", versions = ["v1", "v2"])
http_route("reviews", rules = [
    rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100}),
    rule(backends = {"v1": 100}),
])
request_test("jason sees v2", service = "reviews", headers = {"end-user": "jason"}, backends = "v2")
"""

SHIFTED = POLICY.replace('backends = {"v1": 100}', 'backends = {"v1": 50, "v2": 50}')

CHANGE_KEYS = {"service", "kind", "summary", "old", "new", "risk", "file", "line"}


def compiled(h: Any, text: str, name: str) -> tuple[Bundle, Side]:
    """`text` compiled as tmp_path/NAME/mesh.star: the bundle and a Side named NAME."""
    result = h.compiled(text, name)
    return result.bundle, Side(label=name, commit=None, digest=result.digest)


def report_json(h: Any, base: str, head: str, requests: tuple[SampleRequest, ...] = ()) -> dict[str, Any]:
    base_bundle, base_side = compiled(h, base, "base")
    head_bundle, head_side = compiled(h, head, "head")
    return compare(base_bundle, head_bundle, base_side=base_side, head_side=head_side, requests=requests).to_json()


def test_the_report_has_designs_keys_names_both_sides_and_lists_golden_then_file_requests(h: Any) -> None:
    ann = SampleRequest("ann", RequestInfo(service="reviews", headers={"end-user": "ann"}))
    report = report_json(h, POLICY, POLICY, (ann,))
    assert set(report) == {"behaviour_changed", "base", "head", "changes", "requests", "request_tests"}
    assert report["base"] == {"label": "base", "commit": None, "digest": compiled(h, POLICY, "again")[1].digest}
    assert report["head"] == {"label": "head", "commit": None, "digest": report["base"]["digest"]}
    assert [(r["origin"], r["name"], r["changed"]) for r in report["requests"]] == [
        ("golden", "jason sees v2", []),
        ("file", "ann", []),
    ]
    assert report["request_tests"] == {"added": [], "removed": [], "changed": []}


def test_a_reformatted_policy_has_no_change_in_behaviour(h: Any) -> None:
    reformatted = "# comments and layout only\n\n" + POLICY.replace(" = ", "=")
    report = report_json(h, POLICY, reformatted)
    assert report["behaviour_changed"] is False
    assert report["changes"] == []
    assert report["base"]["digest"] != report["head"]["digest"]  # the source map moved


def test_sample_requests_show_a_weight_change_even_without_the_semantic_diff(h: Any) -> None:
    ann = SampleRequest("ann", RequestInfo(service="reviews"))
    report = report_json(h, POLICY, SHIFTED, (ann,))
    golden, file = report["requests"]
    assert golden["changed"] == []
    assert file["before"]["backends"] == {"v1": 100}
    assert file["after"]["backends"] == {"v1": 50, "v2": 50}
    assert file["changed"] == ["destination"]


def test_a_side_that_cannot_be_built_into_a_decision_table_raises_bundle_error(h: Any) -> None:
    bundle, side = compiled(h, POLICY, "base")
    broken = msgspec.structs.replace(bundle, spec=msgspec.structs.replace(bundle.spec, services={}))
    with pytest.raises(BundleError, match="http_route for undeclared service 'reviews'"):
        compare(bundle, broken, base_side=side, head_side=side)


# -- semantic: these need preview/semantic.py's diff_specs and diff_request_tests ------------


def test_semantic_a_weight_change_is_a_change_in_behaviour_with_designs_change_keys(h: Any) -> None:
    report = report_json(h, POLICY, SHIFTED)
    assert report["behaviour_changed"] is True
    changes = report["changes"]
    assert isinstance(changes, list) and changes
    for change in changes:
        assert set(change) == CHANGE_KEYS
    shift = [c for c in changes if c["kind"] == "traffic.shift"]
    assert len(shift) == 1
    assert shift[0]["service"] == "reviews"
    assert shift[0]["file"] == "mesh.star" and shift[0]["line"] == 7  # rules[1], the one shifted
    assert "shifts 50% of traffic" in shift[0]["risk"]


def test_semantic_golden_requests_added_and_removed_are_request_tests_not_changes(h: Any) -> None:
    head = POLICY.replace("jason sees v2", "jason still sees v2")
    report = report_json(h, POLICY, head)
    assert report["request_tests"] == {"added": ["jason still sees v2"], "removed": ["jason sees v2"], "changed": []}
    assert report["behaviour_changed"] is False
    assert [r["name"] for r in report["requests"]] == ["jason still sees v2", "jason sees v2"]
