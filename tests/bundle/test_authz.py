"""Authorization decisions: sources, methods, exact and prefix paths, audit mode."""

from __future__ import annotations

import pytest

from starmesh.bundle.decide import DecisionTable, RequestInfo, UnknownService
from starmesh.bundle.spec import Allow, Authorization, MeshConfig, Service, SourceLocation, Spec


def _table(*rules: Allow, mode: str = "enforce") -> DecisionTable:
    authz = Authorization(rules=rules, mode=mode)  # type: ignore[arg-type]
    return DecisionTable.build(
        Spec(
            mesh=MeshConfig(name="m"),
            services={"reviews": Service(), "ratings": Service()},
            authorization={"reviews": authz},
            source_map={f"authorization/reviews/{i}": SourceLocation(file="authz.star", line=5 + i) for i in range(len(rules))},
        )
    )


@pytest.mark.parametrize(
    ("source", "method", "path", "allowed"),
    [
        ("productpage", "GET", "/reviews/1", True),
        ("productpage", "get", "/reviews/1", True),
        ("productpage", "GET", "/reviews", False),  # "/reviews/*" is the prefix "/reviews/"
        ("productpage", "GET", "/health", True),
        ("productpage", "GET", "/health/x", False),
        ("productpage", "GET", "/health?verbose=1", True),
        ("productpage", "POST", "/reviews/1", False),
        ("details", "GET", "/reviews/1", False),
        (None, "GET", "/reviews/1", False),  # unauthenticated matches no sources rule
    ],
)
def test_every_given_field_must_hold(source: str | None, method: str, path: str, allowed: bool) -> None:
    table = _table(Allow(sources=("productpage",), methods=("GET",), paths=("/reviews/*", "/health")))
    assert table.authorize("reviews", source, method, path).allowed is allowed


def test_omitted_fields_admit_anything_and_first_admitting_rule_is_reported() -> None:
    table = _table(Allow(methods=("DELETE",)), Allow(paths=("*",)), Allow())
    decision = table.authorize("reviews", None, "GET", "/x")
    assert (decision.allowed, decision.mode, decision.rule_index, decision.would_deny) == (True, "enforce", 1, False)
    assert table.authorize("reviews", None, "DELETE", "/x").rule_index == 0


def test_no_allow_rules_denies_everything_and_no_authorization_allows_everything() -> None:
    table = _table()
    denied = table.authorize("reviews", "productpage", "GET", "/")
    assert (denied.allowed, denied.mode, denied.rule_index) == (False, "enforce", None)
    free = table.authorize("ratings", None, "DELETE", "/")
    assert (free.allowed, free.mode, free.rule_index) == (True, None, None)


def test_audit_mode_allows_but_reports_would_deny() -> None:
    table = _table(Allow(sources=("productpage",)), mode="audit")
    audited = table.authorize("reviews", "details", "GET", "/")
    assert (audited.allowed, audited.mode, audited.rule_index, audited.would_deny) == (True, "audit", None, True)
    admitted = table.authorize("reviews", "productpage", "GET", "/")
    assert (admitted.allowed, admitted.would_deny, admitted.rule_index) == (True, False, 0)
    explained = table.explain(RequestInfo(service="reviews", source="details")).to_json()
    assert explained["authorization"] == {
        "allowed": True,
        "mode": "audit",
        "rule": None,
        "would_deny": True,
        "why": "audit mode lets it through, logged as would_deny: enforcement would deny it; no allow admits the "
        "request: allow[0] (authz.star:5) needs source productpage (the request comes from details)",
    }
    assert explained["response"] is None


def test_explain_reports_denial_as_403_and_the_admitting_rule() -> None:
    table = _table(Allow(methods=("POST",)), Allow(sources=("productpage",)))
    denied = table.explain(RequestInfo(service="reviews", source="details")).to_json()
    assert denied["authorization"] == {
        "allowed": False,
        "mode": "enforce",
        "rule": None,
        "would_deny": False,
        "why": "no allow admits the request: allow[0] (authz.star:5) needs method POST (the request is GET); "
        "allow[1] (authz.star:6) needs source productpage (the request comes from details)",
    }
    assert denied["response"] == {"status": 403, "reason": "denied"}
    allowed = table.explain(RequestInfo(service="reviews", source="productpage")).to_json()
    assert allowed["authorization"]["rule"] == {"index": 1, "file": "authz.star", "line": 6}
    assert allowed["response"] is None


def test_unknown_service_raises() -> None:
    with pytest.raises(UnknownService, match="'ghost'"):
        _table().authorize("ghost", None, "GET", "/")
