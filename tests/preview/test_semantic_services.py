"""diff_specs on the mesh and services: every mesh- and service-level kind with its risk,
mTLS reported once, comments-only commits, the overall order, and golden requests.

Both sides are compiled from real policy files in temporary directories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from starmesh.preview.model import (
    NARROWS_ACCESS,
    RELAXES_MTLS,
    REMOVES_PROTECTION,
    REMOVES_ROUTE,
    Change,
    TestChanges as RequestTestChanges,
)
from starmesh.preview.semantic import diff_request_tests, diff_specs

Diff = Callable[[str, str], list[Change]]


def brief(changes: list[Change]) -> list[tuple[str | None, str, str, tuple[str, ...]]]:
    return [(c.service, c.kind, c.summary, c.risk) for c in changes]


def mesh(**args: str) -> str:
    given = "".join(f", {k} = {v}" for k, v in args.items())
    return f'mesh(name = "shop"{given})\n'


def svc(name: str = "reviews", **args: str) -> str:
    given = "".join(f", {k} = {v}" for k, v in args.items())
    return f'service(name = "{name}"{given})\n'


# -- no change in behaviour ---------------------------------------------------------------------


def test_comments_and_formatting_alone_change_nothing(diff: Diff, h: Any) -> None:
    base = mesh() + svc(versions='["v1", "v2"]') + 'http_route("reviews", rules = [rule(backends = {"v1": 100})])\n'
    head = (
        "# The shop's mesh.\n\n"
        + 'mesh(\n    name = "shop",\n)\n\n'
        + "# Reviews.\n"
        + 'service(\n    name = "reviews",\n    versions = ["v1", "v2"],  # two of them\n)\n'
        + 'http_route("reviews", rules = [\n    rule(backends = {"v1": 100}),\n])\n'
    )
    old, new = h.compile(base), h.compile(head)
    assert old.source_map != new.source_map
    assert diff_specs(old, new) == []


def test_golden_requests_are_checks_not_changes(h: Any) -> None:
    base = mesh() + svc() + 'request_test("home", service = "reviews", backends = "v1")\n'
    base += 'request_test("gone", service = "reviews")\n'
    head = mesh() + svc() + 'request_test("home", service = "reviews", path = "/x", backends = "v1")\n'
    head += 'request_test("new", service = "reviews")\n'
    old, new = h.compile(base), h.compile(head)
    assert diff_specs(old, new) == []
    assert diff_request_tests(old, new) == RequestTestChanges(added=("new",), removed=("gone",), changed=("home",))
    assert not diff_request_tests(old, old)


# -- the mesh ---------------------------------------------------------------------------------------


def test_mesh_mtls_is_reported_once_not_per_inheriting_service(diff: Diff) -> None:
    base = mesh() + svc("a") + svc("b") + svc("c", mtls='"permissive"')
    head = mesh(mtls='"permissive"') + svc("a") + svc("b") + svc("c", mtls='"permissive"')
    changes = diff(base, head)
    assert brief(changes) == [
        (
            None,
            "mesh.mtls",
            "mesh: mtls strict → permissive (plaintext callers accepted, without a proven identity)",
            (RELAXES_MTLS, REMOVES_PROTECTION),
        )
    ]
    assert (changes[0].old, changes[0].new) == ("strict", "permissive")
    assert (changes[0].file, changes[0].line) == ("mesh.star", 1)
    tightened = diff(head, base)
    assert brief(tightened) == [
        (None, "mesh.mtls", "mesh: mtls permissive → strict (plaintext callers refused)", (NARROWS_ACCESS,))
    ]


def test_mesh_identity_telemetry_and_rollout(diff: Diff) -> None:
    base = mesh(
        tracing="tracing(sample_percent = 1)",
        rollout='rollout(canary_percent = 10, bake = "1m", max_failures = 0)',
    ) + svc()
    head = mesh(
        trust_domain='"shop.local"',
        tracing="tracing(sample_percent = 10)",
        access_log="access_log(enabled = False)",
        rollout='rollout(canary_percent = 0, bake = "0s", max_failures = 2)',
    ).replace('"shop"', '"shop2"') + svc()
    changes = diff(base, head)
    assert brief(changes) == [
        (
            None,
            "mesh.trust_domain",
            'mesh: trust_domain "cluster.local" → "shop.local" (every certificate is re-issued)',
            (),
        ),
        (None, "mesh.name", 'mesh: name "shop" → "shop2" (every certificate is re-issued)', ()),
        (None, "mesh.tracing", "mesh: tracing sample_percent 1% → 10%", ()),
        (None, "mesh.access_log", "mesh: access_log enabled True → False", ()),
        (
            None,
            "mesh.rollout",
            "mesh: rollout canary_percent 10% → 0%, bake 1m → 0s, max_failures 0 → 2",
            (REMOVES_PROTECTION,),
        ),
    ]
    assert changes[4].old == {"canary_percent": 10, "bake": "1m", "max_failures": 0}
    assert changes[4].new == {"canary_percent": 0, "bake": "0s", "max_failures": 0 + 2}
    stricter = diff(head, base)
    assert [c.risk for c in stricter if c.kind == "mesh.rollout"] == [()]


# -- services ---------------------------------------------------------------------------------------


def test_services_added_and_removed(diff: Diff) -> None:
    base = mesh() + svc("old", port="8080")
    head = mesh() + svc("new", versions='["v1", "v2"]')
    changes = diff(base, head)
    assert brief(changes) == [
        ("new", "service.added", "new: service added (port 80, versions [v1, v2])", ()),
        (
            "old",
            "service.removed",
            "old: service removed (port 8080, versions [v1]); requests for it get 404 no-route",
            (REMOVES_ROUTE,),
        ),
    ]
    assert changes[0].new == {"port": 80, "versions": ["v1", "v2"], "load_balancer": "round_robin"}
    assert changes[0].old is None and changes[1].new is None
    assert [(c.file, c.line) for c in changes] == [("mesh.star", 2), ("mesh.star", 2)]  # head's, then base's


def test_service_topology(diff: Diff) -> None:
    base = mesh() + svc(port="9080", endpoints='{"v1": ["127.0.0.1:9081"]}')
    head = mesh() + svc(port="8080", load_balancer='"least_request"')
    assert brief(diff(base, head)) == [
        ("reviews", "service.port", "reviews: port 9080 → 8080", ()),
        ("reviews", "service.endpoints", "reviews: endpoints {v1: [127.0.0.1:9081]} → none", ()),
        ("reviews", "service.load_balancer", "reviews: load_balancer round_robin → least_request", ()),
    ]


def test_a_service_mtls_override_is_compared_as_its_effective_mode(diff: Diff) -> None:
    base = mesh() + svc()
    relaxed = mesh() + svc(mtls='"disable"')
    changes = diff(base, relaxed)
    assert brief(changes) == [
        (
            "reviews",
            "service.mtls",
            "reviews: mtls strict → disable (no mTLS: plaintext only, no caller identity proven)",
            (RELAXES_MTLS, REMOVES_PROTECTION),
        )
    ]
    assert changes[0].line == 2
    assert brief(diff(relaxed, base))[0][3] == (NARROWS_ACCESS,)
    # The mesh relaxes while the service pins strict: only the mesh changed for others.
    pinned = mesh(mtls='"permissive"') + svc(mtls='"strict"')
    assert [c.kind for c in diff(base, pinned)] == ["mesh.mtls"]


def test_service_timeout_and_retries(diff: Diff) -> None:
    base = mesh() + svc(timeout='"2s"', retries='retries(attempts = 2, per_try_timeout = "500ms")')
    looser = mesh() + svc(timeout='"5s"', retries="retries(attempts = 2)")
    changes = diff(base, looser)
    assert brief(changes) == [
        ("reviews", "service.timeout", "reviews: timeout 2s → 5s", (REMOVES_PROTECTION,)),
        ("reviews", "service.retries", "reviews: retries per_try_timeout 500ms → none", (REMOVES_PROTECTION,)),
    ]
    assert (changes[0].old, changes[0].new) == ("2s", "5s")
    assert [c.risk for c in diff(looser, base)] == [(), ()]
    assert brief(diff(base, mesh() + svc())) == [
        ("reviews", "service.timeout", "reviews: timeout 2s → none", (REMOVES_PROTECTION,)),
        (
            "reviews",
            "service.retries",
            "reviews: retries attempts 2, per_try_timeout 500ms, on [5xx, connect-failure, reset],"
            " budget_percent 20% → none",
            (REMOVES_PROTECTION,),
        ),
    ]


@pytest.mark.parametrize(
    ("kind", "base", "looser", "tighter"),
    [
        (
            "circuit_breaker",
            "circuit_breaker(max_connections = 100, max_pending_requests = 10, max_requests = 100)",
            "circuit_breaker(max_connections = 100, max_pending_requests = 20, max_requests = 100)",
            "circuit_breaker(max_connections = 50, max_pending_requests = 10, max_requests = 100)",
        ),
        (
            "outlier_detection",
            "outlier_detection(consecutive_5xx = 5, max_ejection_percent = 50)",
            "outlier_detection(consecutive_5xx = 10, max_ejection_percent = 50)",
            "outlier_detection(consecutive_5xx = 3, max_ejection_percent = 50)",
        ),
        (
            "rate_limit",
            "rate_limit(50, burst = 100)",
            "rate_limit(50, burst = 200)",
            "rate_limit(20, burst = 100)",
        ),
    ],
)
def test_guards_removed_or_loosened_remove_protection(
    diff: Diff, kind: str, base: str, looser: str, tighter: str
) -> None:
    with_guard = mesh() + svc(**{kind: base})
    assert [(c.kind, c.risk) for c in diff(with_guard, mesh() + svc(**{kind: looser}))] == [
        (f"service.{kind}", (REMOVES_PROTECTION,))
    ]
    assert [(c.kind, c.risk) for c in diff(with_guard, mesh() + svc(**{kind: tighter}))] == [(f"service.{kind}", ())]
    removed = diff(with_guard, mesh() + svc())
    assert [(c.kind, c.risk, c.new) for c in removed] == [(f"service.{kind}", (REMOVES_PROTECTION,), None)]
    assert removed[0].summary.endswith(" → none")
    assert [(c.kind, c.risk) for c in diff(mesh() + svc(), with_guard)] == [(f"service.{kind}", ())]


def test_rate_limit_summary(diff: Diff) -> None:
    base = mesh() + svc(rate_limit="rate_limit(50, burst = 100)")
    head = mesh() + svc(rate_limit="rate_limit(100)")
    changes = diff(base, head)
    assert [c.summary for c in changes] == ["reviews: rate_limit requests_per_second 50 → 100"]
    assert (changes[0].old, changes[0].new) == (
        {"requests_per_second": 50, "burst": 100},
        {"requests_per_second": 100, "burst": 100},
    )


# -- order --------------------------------------------------------------------------------------------


def test_mesh_first_then_services_by_name_service_level_before_routes(diff: Diff) -> None:
    base = (
        mesh()
        + svc("zeta", versions='["v1", "v2"]')
        + svc("alpha", timeout='"1s"')
        + 'http_route("zeta", rules = [rule(backends = {"v1": 100})])\n'
    )
    head = (
        mesh(tracing="tracing(sample_percent = 5)")
        + svc("zeta", versions='["v1", "v2"]', timeout='"1s"')
        + svc("alpha", timeout='"2s"')
        + 'http_route("zeta", rules = [rule(backends = {"v2": 100})])\n'
        + svc("beta")
    )
    assert [(c.service, c.kind) for c in diff(base, head)] == [
        (None, "mesh.tracing"),
        ("alpha", "service.timeout"),
        ("beta", "service.added"),
        ("zeta", "service.timeout"),
        ("zeta", "traffic.shift"),
    ]


def test_the_access_diff_merges_after_each_services_own_changes(h: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever preview/access.py reports is placed per service: authorization, then access."""
    import starmesh.preview.semantic as semantic

    reported = [
        Change("zeta", "access.gained", "z1"),
        Change("alpha", "access.lost", "a1"),
        Change("alpha", "authorization.added", "a2"),
        Change("beta", "authorization.mode", "b1"),
        Change(None, "access.gained", "m1"),
    ]
    monkeypatch.setattr(semantic, "diff_access", lambda old, new: reported)
    base = mesh() + svc("zeta", versions='["v1", "v2"]') + svc("alpha", timeout='"1s"')
    head = mesh(tracing="tracing(sample_percent = 5)") + svc("zeta", versions='["v2", "v1"]') + svc("alpha")
    assert [(c.service, c.kind) for c in diff_specs(h.compile(base), h.compile(head))] == [
        (None, "mesh.tracing"),
        (None, "access.gained"),
        ("alpha", "service.timeout"),
        ("alpha", "authorization.added"),
        ("alpha", "access.lost"),
        ("beta", "authorization.mode"),
        ("zeta", "service.versions"),
        ("zeta", "access.gained"),
    ]
