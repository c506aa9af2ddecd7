"""diff_access: authorization added, removed or switched to audit, and the caller ->
service edges gained or lost, with their risk and the policy line that caused them.

Both sides are compiled from real policy files in temporary directories."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from starmesh.preview import access
from starmesh.preview.access import diff_access
from starmesh.preview.model import NARROWS_ACCESS, REMOVES_PROTECTION, WIDENS_ACCESS, Change

SERVICES = """
mesh(name = "bookinfo", mtls = "{mtls}")
service(name = "productpage")
service(name = "reviews")
service(name = "ratings")
"""


def policy(text: str, mtls: str = "strict") -> str:
    """The services above, the mesh's mode `mtls`, then `text`: a whole mesh.star."""
    return textwrap.dedent(SERVICES.format(mtls=mtls)).lstrip("\n") + textwrap.dedent(text).lstrip("\n")


def summaries(changes: list[Change]) -> list[str]:
    return [c.summary for c in changes]


READS_REVIEWS = """
authorization("reviews", rules = [
    allow(sources = ["productpage"], methods = ["GET", "POST"], paths = ["/reviews/*"]),
])
"""

RATINGS_TOO = """
authorization("reviews", rules = [
    allow(sources = ["productpage"], methods = ["GET", "POST"], paths = ["/reviews/*"]),
    allow(sources = ["ratings"], methods = ["GET"], paths = ["/reviews/*"]),
])
"""


def test_an_allow_added_for_a_caller_is_an_edge_gained_at_the_head_rule(h: Any) -> None:
    head = policy(RATINGS_TOO)
    changes = diff_access(h.compile(policy(READS_REVIEWS)), h.compile(head))

    assert summaries(changes) == ["ratings → reviews GET /reviews/* now allowed"]
    (gained,) = changes
    assert gained.service == "reviews"
    assert gained.kind == "access.gained"
    assert gained.risk == (WIDENS_ACCESS,)
    assert (gained.file, gained.line) == ("mesh.star", h.line_of(head, 'sources = ["ratings"]'))
    request = {"methods": ["GET"], "paths": ["/reviews/*"], "except_methods": [], "except_paths": []}
    common = {"source": "ratings", "except_sources": [], "methods": ["GET"], "paths": ["/reviews/*"]}
    assert gained.old == {**common, "allowed": False, "requests": [request]}
    assert gained.new == {**common, "allowed": True, "requests": [request]}


def test_a_method_dropped_from_an_allow_is_an_edge_lost_at_the_base_rule(h: Any) -> None:
    base = policy(READS_REVIEWS)
    head = policy(READS_REVIEWS.replace('["GET", "POST"]', '["GET"]'))
    changes = diff_access(h.compile(base), h.compile(head))

    assert summaries(changes) == ["productpage → reviews POST /reviews/* now denied"]
    (lost,) = changes
    assert lost.kind == "access.lost"
    assert lost.risk == (NARROWS_ACCESS,)
    assert (lost.file, lost.line) == ("mesh.star", h.line_of(base, 'sources = ["productpage"]'))
    assert lost.old["allowed"] is True and lost.new["allowed"] is False
    assert lost.new["methods"] == ["POST"]


def test_authorization_added_narrows_access_for_every_caller_it_does_not_admit(h: Any) -> None:
    head = policy(READS_REVIEWS)
    changes = diff_access(h.compile(policy("")), h.compile(head))

    assert [c.kind for c in changes] == ["authorization.added", "access.lost", "access.lost"]
    added = changes[0]
    assert added.summary == "reviews: authorization added (denies what no allow admits; 1 allow rule)"
    assert added.risk == (NARROWS_ACCESS,)
    assert (added.file, added.line) == ("mesh.star", h.line_of(head, 'authorization("reviews"'))
    assert added.old is None and added.new["mode"] == "enforce"
    # productpage keeps GET and POST on /reviews/*; everyone else (mTLS is strict, so
    # unauthenticated clients never got in) loses everything.
    assert summaries(changes[1:]) == [
        "productpage → reviews GET, POST any path (except /reviews/*); "
        "any method (except GET, POST), any path now denied",
        "any service (except productpage) → reviews any method, any path now denied",
    ]
    assert changes[2].new["source"] == "*" and changes[2].new["except_sources"] == ["productpage"]
    assert all(c.risk == (NARROWS_ACCESS,) for c in changes[1:])
    assert all((c.file, c.line) == (added.file, added.line) for c in changes[1:])


def test_authorization_removed_widens_access_and_points_at_the_base(h: Any) -> None:
    base = policy("\n\n" + READS_REVIEWS)  # the base's lines differ from anything in the head
    changes = diff_access(h.compile(base), h.compile(policy("")))

    assert [c.kind for c in changes] == ["authorization.removed", "access.gained", "access.gained"]
    removed = changes[0]
    assert removed.risk == (WIDENS_ACCESS, REMOVES_PROTECTION)
    assert (removed.file, removed.line) == ("mesh.star", h.line_of(base, 'authorization("reviews"'))
    assert removed.new is None and removed.old["rules"][0]["sources"] == ["productpage"]
    assert changes[2].summary == "any service (except productpage) → reviews any method, any path now allowed"
    assert all(c.risk == (WIDENS_ACCESS,) and c.line == removed.line for c in changes[1:])


def test_enforce_to_audit_widens_access_and_back_narrows_it(h: Any) -> None:
    audit_text = policy(READS_REVIEWS.replace("])\n", '], mode = "audit")\n'))
    enforce, audit = h.compile(policy(READS_REVIEWS)), h.compile(audit_text)

    relaxed = diff_access(enforce, audit)
    assert relaxed[0].kind == "authorization.mode"
    assert relaxed[0].summary == (
        "reviews: authorization mode enforce → audit (denies nothing, logs what it would deny)"
    )
    assert relaxed[0].risk == (WIDENS_ACCESS, REMOVES_PROTECTION)
    assert (relaxed[0].old, relaxed[0].new) == ("enforce", "audit")
    assert relaxed[0].line == h.line_of(audit_text, 'authorization("reviews"')
    assert [c.kind for c in relaxed[1:]] == ["access.gained", "access.gained"]

    tightened = diff_access(audit, enforce)
    assert tightened[0].risk == (NARROWS_ACCESS,)
    assert [c.kind for c in tightened[1:]] == ["access.lost", "access.lost"]
    assert [c.summary.replace("denied", "") for c in tightened[1:]] == [
        c.summary.replace("allowed", "") for c in relaxed[1:]
    ]


def test_an_authorization_added_in_audit_mode_changes_no_edge(h: Any) -> None:
    head = policy(READS_REVIEWS.replace("])\n", '], mode = "audit")\n'))
    changes = diff_access(h.compile(policy("")), h.compile(head))

    assert [(c.kind, c.risk) for c in changes] == [("authorization.added", ())]
    assert "audit mode" in changes[0].summary


def test_mesh_mtls_relaxed_lets_unauthenticated_callers_in_where_rules_admit_them(h: Any) -> None:
    rules = """
    authorization("reviews", rules = [allow(sources = ["productpage"])])
    authorization("ratings", rules = [allow(paths = ["/health"])])
    """
    head = policy(rules, mtls="permissive")
    changes = diff_access(h.compile(policy(rules)), h.compile(head))

    # productpage has no authorization: everything; ratings: what needs no identity;
    # reviews: nothing, its only allow names a source.
    assert summaries(changes) == [
        "unauthenticated → productpage any method, any path now allowed",
        "unauthenticated → ratings any method, /health now allowed",
    ]
    assert all(c.kind == "access.gained" and c.risk == (WIDENS_ACCESS,) for c in changes)
    assert all(c.old["source"] is None and c.new["source"] is None for c in changes)
    # No allow changed: the mTLS setting did it.
    assert all((c.file, c.line) == ("mesh.star", h.line_of(head, "mesh(")) for c in changes)


def test_service_mtls_tightened_shuts_out_unauthenticated_callers(h: Any) -> None:
    base = policy("").replace('service(name = "ratings")', 'service(name = "ratings", mtls = "permissive")')
    head = policy("").replace('service(name = "ratings")', 'service(name = "ratings", mtls = "strict")')
    changes = diff_access(h.compile(base), h.compile(head))

    assert summaries(changes) == ["unauthenticated → ratings any method, any path now denied"]
    assert changes[0].risk == (NARROWS_ACCESS,)
    assert (changes[0].file, changes[0].line) == ("mesh.star", h.line_of(head, 'service(name = "ratings"'))


def test_mtls_disabled_proves_no_identity_so_sources_rules_admit_nobody(h: Any) -> None:
    changes = diff_access(h.compile(policy(READS_REVIEWS)), h.compile(policy(READS_REVIEWS, "disable")))

    by_who = {c.summary.split(" → ")[0]: c for c in changes if c.service == "reviews"}
    assert by_who["productpage"].summary == "productpage → reviews GET, POST /reviews/* now denied"
    assert by_who["productpage"].line == 1  # the mesh's mtls, not the allow
    assert "unauthenticated" not in by_who  # it connects now, but the allow still wants a source
    assert summaries([c for c in changes if c.service == "ratings"]) == [
        "unauthenticated → ratings any method, any path now allowed"
    ]


def test_an_allow_narrowed_from_every_path_to_a_prefix(h: Any) -> None:
    base = policy('authorization("reviews", rules = [\n    allow(sources = ["productpage"], paths = ["/*"]),\n])\n')
    head = policy("\n" + base.split("\n", 4)[4].replace('"/*"', '"/reviews/*"'))
    changes = diff_access(h.compile(base), h.compile(head))

    assert summaries(changes) == ["productpage → reviews any method, any path (except /reviews/*) now denied"]
    assert changes[0].new["requests"] == [
        {"methods": ["*"], "paths": ["*"], "except_methods": [], "except_paths": ["/reviews/*"]}
    ]
    assert changes[0].line == h.line_of(base, 'paths = ["/*"]')


def test_an_exact_path_widened_to_a_prefix_names_what_is_new(h: Any) -> None:
    base = policy('authorization("reviews", rules = [allow(sources = ["productpage"], paths = ["/reviews"])])')
    head = policy('authorization("reviews", rules = [allow(sources = ["productpage"], paths = ["/reviews*"])])')
    changes = diff_access(h.compile(base), h.compile(head))

    assert summaries(changes) == ["productpage → reviews any method, /reviews* (except /reviews) now allowed"]


def test_an_allow_without_sources_admits_every_caller_that_connects(h: Any) -> None:
    rules = """
    authorization("reviews", rules = [
        allow(sources = ["productpage"]),
        allow(methods = ["GET"], paths = ["/health"]),
    ])
    """
    head = policy(rules, mtls="permissive")
    base = policy(rules.replace("/health", "/ready"), mtls="permissive")
    changes = diff_access(h.compile(base), h.compile(head))

    reviews = [c for c in changes if c.service == "reviews"]
    assert summaries(reviews) == [
        "any service (except productpage) → reviews GET /health now allowed",
        "any service (except productpage) → reviews GET /ready now denied",
        "unauthenticated → reviews GET /health now allowed",
        "unauthenticated → reviews GET /ready now denied",
    ]
    assert {c.line for c in reviews} == {h.line_of(head, "/health")}


def test_a_new_service_is_a_new_caller_only_where_an_allow_admits_it(h: Any) -> None:
    rules = """
    authorization("reviews", rules = [
        allow(sources = ["productpage"]),
        allow(methods = ["GET"], paths = ["/public/*"]),
    ])
    """
    head = policy(rules) + 'service(name = "details")\n'
    changes = diff_access(h.compile(policy(rules)), h.compile(head))

    # details reaches productpage and ratings too (no authorization there), but no rule
    # decides that; its addition is the semantic diff's service.added.
    assert summaries(changes) == ["details → reviews GET /public/* now allowed"]
    assert changes[0].line == h.line_of(head, "/public/*")


def test_removed_services_are_neither_callers_nor_targets(h: Any) -> None:
    base = policy(RATINGS_TOO) + 'service(name = "details")\nauthorization("details", rules = [])\n'
    head = policy(RATINGS_TOO.replace('allow(sources = ["ratings"], methods = ["GET"], paths = ["/reviews/*"]),', ""))
    head = head.replace('service(name = "ratings")\n', "")
    assert diff_access(h.compile(base), h.compile(head)) == []


def test_comments_formatting_and_equivalent_rewrites_change_nothing(h: Any) -> None:
    base = policy(RATINGS_TOO)
    head = "# reviewed by security\n\n" + policy(RATINGS_TOO).replace("allow(", "allow(  ")
    assert diff_access(h.compile(base), h.compile(head)) == []

    # One allow split in two that admit the same requests: no edge moves.
    split = RATINGS_TOO.replace(
        'allow(sources = ["productpage"], methods = ["GET", "POST"], paths = ["/reviews/*"]),',
        'allow(sources = ["productpage"], methods = ["POST"], paths = ["/reviews/*"]),\n'
        '    allow(sources = ["productpage", "ratings"], methods = ["GET"], paths = ["/reviews/*"]),',
    )
    assert diff_access(h.compile(base), h.compile(policy(split))) == []


def test_changes_are_sorted_by_service_then_authorization_then_caller(h: Any) -> None:
    base = policy('authorization("ratings", rules = [allow(sources = ["reviews"])])', "permissive")
    head = policy(
        """
        authorization("reviews", rules = [
            allow(sources = ["ratings"], methods = ["POST"]),
            allow(sources = ["productpage"], methods = ["GET"]),
        ])
        authorization("ratings", rules = [allow(sources = ["reviews", "productpage"])])
        """,
        "permissive",
    )
    changes = diff_access(h.compile(base), h.compile(head))

    assert [(c.service, c.kind) for c in changes] == [
        ("ratings", "access.gained"),
        ("reviews", "authorization.added"),
        *[("reviews", "access.lost")] * 4,
    ]
    assert summaries(changes)[0] == "productpage → ratings any method, any path now allowed"
    assert summaries(changes)[2:] == [
        "productpage → reviews any method (except GET), any path now denied",
        "ratings → reviews any method (except POST), any path now denied",
        "reviews → reviews any method, any path now denied",
        "unauthenticated → reviews any method, any path now denied",
    ]
    assert [c.new["source"] for c in changes[2:]] == ["productpage", "ratings", "reviews", None]


def test_too_many_combinations_fall_back_to_one_coarse_change(h: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    base, head = h.compile(policy(READS_REVIEWS)), h.compile(policy(RATINGS_TOO))
    monkeypatch.setattr(access, "MAX_COMBINATIONS", 4)
    changes = diff_access(base, head)

    assert [(c.kind, c.service) for c in changes] == [("authorization.rules", "reviews")]
    assert "too many combinations to enumerate" in changes[0].summary
    assert changes[0].risk == (WIDENS_ACCESS, NARROWS_ACCESS)
    assert changes[0].line == h.line_of(policy(RATINGS_TOO), 'authorization("reviews"')


def test_every_service_alike_reads_any_service_and_methods_compare_case_insensitively(h: Any) -> None:
    base = policy('authorization("reviews", rules = [allow(methods = ["get"], paths = ["/health"])])')
    head = policy('authorization("reviews", rules = [allow(methods = ["GET", "HEAD"], paths = ["/health"])])')
    changes = diff_access(h.compile(base), h.compile(head))

    assert summaries(changes) == ["any service → reviews HEAD /health now allowed"]
    assert changes[0].new["source"] == "*" and changes[0].new["except_sources"] == []
    assert changes[0].line == h.line_of(head, "HEAD")
    assert diff_access(h.compile(base), h.compile(base.replace('"get"', '"GET"'))) == []
