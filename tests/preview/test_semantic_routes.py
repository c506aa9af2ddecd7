"""diff_specs on routing: rules paired by key, traffic shifts, match changes, reorders,
shadowing, rules added and removed, per-rule settings, and the order changes come in.

Both sides are compiled from real policy files in temporary directories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starmesh.bundle.spec import Match, Rule, StringMatch
from starmesh.preview.model import (
    ADDS_FAULTS,
    CHANGES_PRECEDENCE,
    MIRRORS_TRAFFIC,
    REMOVES_PROTECTION,
    REMOVES_ROUTE,
    UNREACHABLE_RULE,
    Change,
)
from starmesh.preview.semantic_routes import pair_rules

Diff = Callable[[str, str], list[Change]]


def brief(changes: list[Change]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.kind, c.summary, c.risk) for c in changes]


MESH = 'mesh(name = "shop")\nservice(name = "reviews", versions = ["v1", "v2", "v3"])\n'

JASON = 'rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100}),'
BOB = 'rule(match = [match(headers = {"end-user": "bob"})], backends = {"v2": 100}),'
API = 'rule(match = [match(path_prefix = "/api/")], backends = {"v3": 100}),'


def routes(*rules: str) -> str:
    body = "".join(f"    {r}\n" for r in rules)
    return MESH + f'http_route("reviews", rules = [\n{body}])\n'


# -- traffic -------------------------------------------------------------------------------


def test_a_weight_change_shifts_the_sum_of_the_increases(diff: Diff, h: Any) -> None:
    base = routes(JASON, 'rule(backends = {"v1": 90, "v3": 10}),')
    head = routes(JASON, 'rule(backends = {"v1": 50, "v3": 50}),')
    changes = diff(base, head)
    assert brief(changes) == [
        (
            "traffic.shift",
            "reviews rules[1] (all requests): v1 90% → 50%, v3 10% → 50%",
            ("shifts 40% of traffic",),
        )
    ]
    assert changes[0].old == {"v1": 90, "v3": 10}
    assert changes[0].new == {"v1": 50, "v3": 50}
    where = (changes[0].service, changes[0].file, changes[0].line)
    assert where == ("reviews", "mesh.star", h.line_of(head, "v1\": 50"))


def test_a_single_rule_is_named_by_its_service(diff: Diff) -> None:
    changes = diff(routes('rule(backends = {"v1": 90, "v3": 10}),'), routes('rule(backends = {"v2": 100}),'))
    assert brief(changes) == [
        ("traffic.shift", "reviews: v1 90% → 0%, v2 0% → 100%, v3 10% → 0%", ("shifts 100% of traffic",))
    ]


def test_a_drained_version_at_zero_is_the_same_traffic(diff: Diff) -> None:
    base = routes('rule(backends = {"v1": 100}),')
    head = routes('rule(backends = {"v1": 100, "v2": 0}),')
    assert diff(base, head) == []


def test_the_first_route_of_a_service_pairs_with_its_implicit_catch_all(diff: Diff, h: Any) -> None:
    base = MESH
    head = routes('rule(backends = {"v1": 100}),')
    changes = diff(base, head)
    assert brief(changes) == [
        ("traffic.shift", "reviews: all endpoints (v1 34%, v2 33%, v3 33%) → v1 100%", ("shifts 66% of traffic",))
    ]
    assert changes[0].old == {"v1": 34, "v2": 33, "v3": 33}
    assert (changes[0].file, changes[0].line) == ("mesh.star", h.line_of(head, "rule(backends"))


def test_the_first_route_with_a_header_rule_adds_that_rule(diff: Diff) -> None:
    head = routes(JASON, "rule(),")
    assert brief(diff(MESH, head)) == [
        ("route.added", 'reviews rules[0] (header end-user = "jason"): new rule → v2 100%', ())
    ]


def test_removing_the_http_route_sends_traffic_to_all_endpoints_again(diff: Diff, h: Any) -> None:
    base = routes('rule(backends = {"v1": 100}),')
    changes = diff(base, MESH)
    assert brief(changes) == [
        ("traffic.shift", "reviews: v1 100% → all endpoints (v1 34%, v2 33%, v3 33%)", ("shifts 66% of traffic",))
    ]
    assert changes[0].line == h.line_of(MESH, "service(")


def test_new_versions_shift_the_equal_split_of_a_rule_without_backends(diff: Diff) -> None:
    base = 'mesh(name = "shop")\nservice(name = "reviews", versions = ["v1"])\n'
    head = 'mesh(name = "shop")\nservice(name = "reviews", versions = ["v1", "v2"])\n'
    assert brief(diff(base, head)) == [
        ("service.versions", "reviews: versions [v1] → [v1, v2]", ()),
        ("traffic.shift", "reviews: all endpoints: v1 100% → 50%, v2 0% → 50%", ("shifts 50% of traffic",)),
    ]


# -- pairing: match, reorder, added, removed --------------------------------------------------


def test_an_unpaired_rule_at_the_same_index_is_a_match_change(diff: Diff, h: Any) -> None:
    base = routes(JASON, 'rule(backends = {"v1": 100}),')
    head = routes(BOB, 'rule(backends = {"v1": 100}),')
    changes = diff(base, head)
    assert brief(changes) == [
        (
            "route.match",
            'reviews rules[0] (header end-user = "bob"): '
            'match (header end-user = "jason") → (header end-user = "bob")',
            (CHANGES_PRECEDENCE,),
        )
    ]
    assert changes[0].old == [{"headers": {"end-user": {"kind": "exact", "value": "jason"}}}]
    assert changes[0].new == [{"headers": {"end-user": {"kind": "exact", "value": "bob"}}}]
    assert changes[0].line == h.line_of(head, "bob")


def test_rules_that_trade_places_are_one_reorder(diff: Diff, h: Any) -> None:
    base = routes(JASON, API, 'rule(backends = {"v1": 100}),')
    head = routes(API, JASON, 'rule(backends = {"v1": 100}),')
    changes = diff(base, head)
    assert brief(changes) == [
        (
            "route.reordered",
            'reviews: rules reordered: (header end-user = "jason"), (prefix /api/), (all requests)'
            ' → (prefix /api/), (header end-user = "jason"), (all requests)',
            (CHANGES_PRECEDENCE,),
        )
    ]
    assert changes[0].old == ['header end-user = "jason"', "prefix /api/", "all requests"]
    assert changes[0].new == ["prefix /api/", 'header end-user = "jason"', "all requests"]
    assert changes[0].line == h.line_of(head, "http_route(")


def test_a_removed_rule_removes_a_route_and_points_at_the_base(diff: Diff, h: Any) -> None:
    base = routes(JASON, 'rule(backends = {"v1": 100}),')
    head = routes('rule(backends = {"v1": 100}),')
    changes = diff(base, head)
    assert brief(changes) == [
        (
            "route.removed",
            'reviews rules[0] (header end-user = "jason"): rule removed (it sent v2 100%)',
            (REMOVES_ROUTE,),
        )
    ]
    assert changes[0].new is None
    assert changes[0].old == {
        "match": [{"headers": {"end-user": {"kind": "exact", "value": "jason"}}}],
        "backends": {"v2": 100},
    }
    assert changes[0].line == h.line_of(base, "jason")


def test_duplicate_matches_pair_in_order() -> None:
    jason = (Match(headers={"end-user": StringMatch(kind="exact", value="jason")}),)
    a, a2, b = Rule(match=jason, backends={"v1": 100}), Rule(match=jason, backends={"v2": 100}), Rule()
    pairing = pair_rules([a, a2, b], [a, b])
    assert pairing.by_key == ((0, 0), (2, 1))
    assert (pairing.by_index, pairing.removed, pairing.added) == ((), (1,), ())
    moved = pair_rules([a, b], [b, Rule(match=(Match(path_prefix="/x"),)), a])
    assert moved.by_key == ((0, 2), (1, 0))
    assert (moved.by_index, moved.removed, moved.added) == ((), (), (1,))
    changed = pair_rules([a, b], [Rule(match=(Match(path_exact="/y"),)), b])
    assert (changed.by_key, changed.by_index) == (((1, 1),), ((0, 0),))


# -- shadowing ---------------------------------------------------------------------------------


def test_a_catch_all_inserted_before_rules_shadows_them(diff: Diff, h: Any) -> None:
    base = routes(JASON, 'rule(backends = {"v1": 100}),')
    root = 'rule(match = [match(path_prefix = "/")], backends = {"v3": 100}),'
    head = routes(root, JASON, 'rule(backends = {"v1": 100}),')
    changes = diff(base, head)
    assert brief(changes) == [
        ("route.added", "reviews rules[0] (prefix /): new rule → v3 100%", ()),
        (
            "route.shadowed",
            'reviews rules[1] (header end-user = "jason"): can never match now: '
            "rules[0] (prefix /) before it already matches every request it does",
            (UNREACHABLE_RULE,),
        ),
        (
            "route.shadowed",
            "reviews rules[2] (all requests): can never match now: "
            "rules[0] (prefix /) before it already matches every request it does",
            (UNREACHABLE_RULE,),
        ),
    ]
    assert (changes[1].old, changes[1].new) == ([], [0])
    lines = [h.line_of(head, "prefix"), h.line_of(head, "jason"), h.line_of(head, 'rule(backends = {"v1"')]
    assert [c.line for c in changes] == lines


def test_an_added_rule_that_cannot_match_is_added_and_shadowed(diff: Diff) -> None:
    base = routes('rule(backends = {"v1": 100}),')
    head = routes('rule(backends = {"v1": 100}),', JASON)
    assert brief(diff(base, head)) == [
        ("route.added", 'reviews rules[1] (header end-user = "jason"): new rule → v2 100%', ()),
        (
            "route.shadowed",
            'reviews rules[1] (header end-user = "jason"): can never match now: '
            "rules[0] (all requests) before it already matches every request it does",
            (UNREACHABLE_RULE,),
        ),
    ]


def test_a_rule_moved_above_the_catch_all_is_reachable_again(diff: Diff) -> None:
    base = routes('rule(backends = {"v1": 100}),', JASON)
    head = routes(JASON, 'rule(backends = {"v1": 100}),')
    changes = diff(base, head)
    assert [(c.kind, c.risk) for c in changes] == [
        ("route.reordered", (CHANGES_PRECEDENCE,)),
        ("route.unshadowed", ()),
    ]
    assert changes[1].summary == (
        'reviews rules[0] (header end-user = "jason"): can match again: no earlier rule covers it now'
    )
    assert (changes[1].old, changes[1].new) == ([0], [])


def test_a_rule_covered_by_an_earlier_narrower_rule_is_shadowed(diff: Diff) -> None:
    """SM411's analysis: an earlier prefix covers every path the later rule matches."""
    base = routes('rule(match = [match(path_prefix = "/api/v1/")], backends = {"v2": 100}),', "rule(),")
    head = routes(API, 'rule(match = [match(path_prefix = "/api/v1/")], backends = {"v2": 100}),', "rule(),")
    kinds = [(c.kind, c.summary.split(":")[0]) for c in diff(base, head)]
    assert kinds == [
        ("route.added", "reviews rules[0] (prefix /api/)"),
        ("route.shadowed", "reviews rules[1] (prefix /api/v1/)"),
    ]


# -- per-rule settings ---------------------------------------------------------------------------


def test_a_rule_timeout_removed_and_a_per_try_timeout_raised_remove_protection(diff: Diff) -> None:
    base = routes(JASON, 'rule(timeout = "1s", retries = retries(attempts = 2, per_try_timeout = "300ms")),')
    head = routes(JASON, 'rule(retries = retries(attempts = 2, per_try_timeout = "500ms")),')
    changes = diff(base, head)
    assert brief(changes) == [
        ("route.timeout", "reviews rules[1] (all requests): timeout 1s → none", (REMOVES_PROTECTION,)),
        (
            "route.retries",
            "reviews rules[1] (all requests): retries per_try_timeout 300ms → 500ms",
            (REMOVES_PROTECTION,),
        ),
    ]
    assert (changes[0].old, changes[0].new) == ("1s", None)
    assert changes[1].new == {
        "attempts": 2,
        "per_try_timeout": "500ms",
        "on": ["5xx", "connect-failure", "reset"],
        "budget_percent": 20,
    }


def test_tighter_rule_timeouts_carry_no_risk(diff: Diff) -> None:
    base = routes('rule(timeout = "2s", retries = retries(attempts = 1, per_try_timeout = "1s")),')
    head = routes('rule(timeout = "250ms", retries = retries(attempts = 3, per_try_timeout = "50ms")),')
    assert brief(diff(base, head)) == [
        ("route.timeout", "reviews: timeout 2s → 250ms", ()),
        ("route.retries", "reviews: retries attempts 1 → 3, per_try_timeout 1s → 50ms", ()),
    ]


def test_faults_added_or_raised_add_faults(diff: Diff) -> None:
    plain = routes('rule(backends = {"v1": 100}),')
    half = routes('rule(backends = {"v1": 100}, fault = fault(abort_status = 503, abort_percent = 50)),')
    slow = routes(
        'rule(backends = {"v1": 100},'
        ' fault = fault(delay = "2s", delay_percent = 10, abort_status = 503, abort_percent = 20)),'
    )
    assert brief(diff(plain, half)) == [("route.fault", "reviews: fault none → abort 503 for 50%", (ADDS_FAULTS,))]
    assert brief(diff(half, slow)) == [
        ("route.fault", "reviews: fault abort 503 for 50% → delay 2s for 10%, abort 503 for 20%", (ADDS_FAULTS,))
    ]
    assert brief(diff(half, plain)) == [("route.fault", "reviews: fault abort 503 for 50% → none", ())]


def test_mirrors_added_or_raised_mirror_traffic(diff: Diff) -> None:
    plain = routes('rule(backends = {"v1": 100}),')
    quarter = routes('rule(backends = {"v1": 100}, mirror = mirror("v2", percent = 25)),')
    half = routes('rule(backends = {"v1": 100}, mirror = mirror("v2", percent = 50)),')
    assert brief(diff(plain, quarter)) == [("route.mirror", "reviews: mirror none → v2 25%", (MIRRORS_TRAFFIC,))]
    assert brief(diff(quarter, half)) == [("route.mirror", "reviews: mirror v2 25% → v2 50%", (MIRRORS_TRAFFIC,))]
    changes = diff(half, quarter)
    assert brief(changes) == [("route.mirror", "reviews: mirror v2 50% → v2 25%", ())]
    assert (changes[0].old, changes[0].new) == ({"version": "v2", "percent": 50}, {"version": "v2", "percent": 25})


def test_request_header_changes(diff: Diff) -> None:
    base = routes('rule(set_request_headers = {"x-canary": "1", "x-old": "a"}),')
    head = routes('rule(set_request_headers = {"x-canary": "2", "x-new": "b"}, remove_request_headers = ["x-debug"]),')
    changes = diff(base, head)
    assert brief(changes) == [
        (
            "route.headers",
            'reviews: request headers: sets x-canary = "1" → "2", sets x-new = "b",'
            " no longer sets x-old, removes x-debug",
            (),
        )
    ]
    assert changes[0].new == {
        "set_request_headers": {"x-canary": "2", "x-new": "b"},
        "remove_request_headers": ["x-debug"],
    }


def test_an_added_rule_with_a_fault_and_a_mirror_reports_their_risk(diff: Diff) -> None:
    base = routes("rule(),")
    head = routes(
        'rule(match = [match(headers = {"end-user": "chaos"})], backends = {"v1": 100},'
        ' fault = fault(abort_status = 500, abort_percent = 100), mirror = mirror("v2")),',
        "rule(),",
    )
    assert brief(diff(base, head)) == [
        ("route.added", 'reviews rules[0] (header end-user = "chaos"): new rule → v1 100%', ()),
        (
            "route.fault",
            'reviews rules[0] (header end-user = "chaos"): fault none → abort 500 for 100%',
            (ADDS_FAULTS,),
        ),
        ("route.mirror", 'reviews rules[0] (header end-user = "chaos"): mirror none → v2 100%', (MIRRORS_TRAFFIC,)),
    ]


# -- order ----------------------------------------------------------------------------------------


def test_changes_come_in_head_rule_order_with_removals_after_their_predecessor(diff: Diff, h: Any) -> None:
    base = routes(JASON, API, 'rule(match = [match(path_prefix = "/b/")]),', 'rule(backends = {"v1": 90, "v3": 10}),')
    head = routes(
        'rule(match = [match(path_prefix = "/a/")], backends = {"v1": 100}),',
        'rule(match = [match(path_prefix = "/api/")], backends = {"v3": 100}, timeout = "1s"),',
        'rule(backends = {"v1": 50, "v3": 50}),',
    )
    changes = diff(base, head)
    assert [(c.kind, c.summary.split(":")[0]) for c in changes] == [
        ("route.match", "reviews rules[0] (prefix /a/)"),
        ("traffic.shift", "reviews rules[0] (prefix /a/)"),
        ("route.timeout", "reviews rules[1] (prefix /api/)"),
        ("route.removed", "reviews rules[2] (prefix /b/)"),
        ("traffic.shift", "reviews rules[2] (all requests)"),
    ]
    assert [c.line for c in changes] == [
        h.line_of(head, "/a/"),
        h.line_of(head, "/a/"),
        h.line_of(head, "/api/"),
        h.line_of(base, "/b/"),
        h.line_of(head, '"v1": 50'),
    ]
