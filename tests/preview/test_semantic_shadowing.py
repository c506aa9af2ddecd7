"""`unreachable_rules`, the shadowing analysis the diff shares with lint's SM401/SM411:
what it finds, and that it finds exactly the rules lint warns about."""

from __future__ import annotations

from pathlib import Path

import pytest

from starmesh.bundle.spec import Match, MeshConfig, Rule, Service, SourceLocation, Spec, StringMatch
from starmesh.compiler.compile import compile_tree
from starmesh.compiler.lint import lint_spec
from starmesh.compiler.rules.shadowing import unreachable_rules

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bookinfo" / "policies"


def header(name: str, value: str) -> Match:
    return Match(headers={name: StringMatch(kind="exact", value=value)})


JASON = Rule(match=(header("end-user", "jason"),), backends={"v2": 100})
API = Rule(match=(Match(path_prefix="/api/"),))
API_V1 = Rule(match=(Match(path_prefix="/api/v1/"),))
CATCH_ALL = Rule()
ROOT_PREFIX = Rule(match=(Match(path_prefix="/"),))


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ((JASON, CATCH_ALL), {}),
        ((CATCH_ALL, JASON, API), {1: (0,), 2: (0,)}),
        ((JASON, ROOT_PREFIX, API, CATCH_ALL), {2: (1,), 3: (1,)}),
        ((API, API_V1, CATCH_ALL), {1: (0,)}),
        ((API_V1, API), {}),
        # Each match covered by a different earlier rule: both are named, in order.
        ((JASON, API, Rule(match=(Match(path_prefix="/api/x/"), header("end-user", "jason")))), {2: (1, 0)}),
        ((JASON, JASON), {1: (0,)}),
        ((), {}),
    ],
)
def test_unreachable_rules(rules: tuple[Rule, ...], expected: dict[int, tuple[int, ...]]) -> None:
    assert unreachable_rules(rules) == expected


def lint_keys(spec: Spec) -> set[tuple[str, str, int]]:
    """(code, service, rule index) of every SM401/SM411 finding, from its location."""
    by_place = {(loc.file, loc.line): key for key, loc in spec.source_map.items() if key.startswith("route/")}
    found: set[tuple[str, str, int]] = set()
    for finding in lint_spec(spec):
        if finding.code in ("SM401", "SM411"):
            _, service, index = by_place[(finding.file, finding.line)].split("/")
            found.add((finding.code, service, int(index)))
    return found


def test_it_finds_what_lint_reports() -> None:
    routes = {
        "a": (CATCH_ALL, JASON, API),
        "b": (API, API_V1, JASON, Rule(match=(header("end-user", "jason"), Match(path_exact="/api/x"))), CATCH_ALL),
        "c": (JASON, API),
    }
    source_map = {
        f"route/{name}/{i}": SourceLocation(file="mesh.star", line=10 * n + i + 1)
        for n, (name, rules) in enumerate(routes.items())
        for i in range(len(rules))
    }
    services = {name: Service(versions=("v1", "v2")) for name in routes}
    spec = Spec(mesh=MeshConfig(name="demo"), services=services, routes=routes, source_map=source_map)
    from_analysis = {
        ("SM401" if is_after_catch_all(routes[name], i) else "SM411", name, i)
        for name in routes
        for i in unreachable_rules(routes[name])
    }
    assert from_analysis == lint_keys(spec) == {
        ("SM401", "a", 1),
        ("SM401", "a", 2),
        ("SM411", "b", 1),
        ("SM411", "b", 3),
    }


def is_after_catch_all(rules: tuple[Rule, ...], index: int) -> bool:
    return any(not rule.match for rule in rules[:index])


def test_the_example_has_no_unreachable_rule() -> None:
    result = compile_tree(EXAMPLE)
    assert result.bundle is not None
    spec = result.bundle.spec
    assert {name: unreachable_rules(rules) for name, rules in spec.routes.items()} == {name: {} for name in spec.routes}
    assert lint_keys(spec) == set()
