"""SM405 timeout inversion and SM406 retry amplification along the call graph that
authorization sources reveal (an allow on B naming A is the edge A -> B)."""

from __future__ import annotations

import msgspec

from starmesh.bundle.spec import Allow, Authorization, MeshConfig, Retries, Rule, Service, SourceLocation, Spec
from starmesh.compiler.lint import lint_spec
from starmesh.compiler.rules.context import LintContext


def located(spec: Spec) -> Spec:
    keys = ["mesh", *(f"service/{n}" for n in spec.services)]
    for name, rules in spec.routes.items():
        keys += [f"http_route/{name}", *(f"route/{name}/{i}" for i in range(len(rules)))]
    for name, authorization in spec.authorization.items():
        keys += [f"authorization/{name}", *(f"authorization/{name}/{i}" for i in range(len(authorization.rules)))]
    return msgspec.structs.replace(
        spec, source_map={k: SourceLocation(file="mesh.star", line=n) for n, k in enumerate(keys, 1)}
    )


def found(spec: Spec, code: str) -> list[str]:
    by_line = {loc.line: key for key, loc in spec.source_map.items()}
    return [by_line[f.line] for f in lint_spec(spec) if f.code == code]


def calls(*edges: tuple[str, str]) -> dict[str, Authorization]:
    """Authorizations that make each (caller, callee) an edge."""
    callers: dict[str, list[str]] = {}
    for caller, callee in edges:
        callers.setdefault(callee, []).append(caller)
    return {callee: Authorization(rules=(Allow(sources=tuple(names)),)) for callee, names in callers.items()}


def make(services: dict[str, Service], *edges: tuple[str, str], routes: dict[str, tuple[Rule, ...]] | None = None) -> Spec:
    return located(Spec(mesh=MeshConfig(name="demo"), services=services, routes=routes or {}, authorization=calls(*edges)))


FAST_RETRIES = Retries(attempts=2, per_try_timeout_ms=500)  # up to 3 tries x 500ms = 1.5s


def test_call_edges_come_from_allow_sources_without_self_calls_or_unknown_services() -> None:
    spec = make(
        {"a": Service(), "b": Service(), "c": Service()},
        ("a", "b"), ("c", "b"), ("b", "b"), ("ghost", "b"), ("b", "c"),
    )
    edges = [(e.caller, e.callee) for e in LintContext(spec).call_edges]
    assert edges == [("a", "b"), ("b", "c"), ("c", "b")]


def test_sm405_caller_timeout_shorter_than_callee_tries() -> None:
    spec = make({"front": Service(timeout_ms=1000), "back": Service(retries=FAST_RETRIES)}, ("front", "back"))
    assert found(spec, "SM405") == ["service/front"]
    [finding] = [f for f in lint_spec(spec) if f.code == "SM405"]
    assert '"back"' in finding.message and "1s" in finding.message and "1500ms" in finding.message
    assert "3 tries x 500ms" in finding.message
    assert finding.hint is not None and "1500ms" in finding.hint


def test_sm405_passes_when_the_caller_waits_long_enough() -> None:
    spec = make({"front": Service(timeout_ms=2000), "back": Service(retries=FAST_RETRIES)}, ("front", "back"))
    assert found(spec, "SM405") == []


def test_sm405_callee_timeout_caps_its_tries() -> None:
    # back's own 1s timeout cuts its 1.5s of tries short, so front's 1.2s is enough.
    spec = make(
        {"front": Service(timeout_ms=1200), "back": Service(timeout_ms=1000, retries=FAST_RETRIES)}, ("front", "back")
    )
    assert found(spec, "SM405") == []


def test_sm405_callee_timeout_without_per_try_timeout() -> None:
    spec = make({"front": Service(timeout_ms=500), "back": Service(timeout_ms=2000)}, ("front", "back"))
    assert found(spec, "SM405") == ["service/front"]
    assert "(its timeout)" in next(f.message for f in lint_spec(spec) if f.code == "SM405")


def test_sm405_ignores_unbounded_callees_and_callers_without_timeout() -> None:
    spec = make(
        {"front": Service(timeout_ms=100), "back": Service(retries=Retries()), "other": Service(), "edge": Service()},
        ("front", "back"), ("other", "front"), ("edge", "other"),
    )
    assert found(spec, "SM405") == []


def test_sm405_on_caller_rule_timeouts_and_callee_rule_retries() -> None:
    spec = make(
        {"front": Service(versions=("v1", "v2")), "back": Service(versions=("v1", "v2"))},
        ("front", "back"),
        routes={
            "front": (Rule(backends={"v2": 100}, timeout_ms=300, match=()), ),
            "back": (Rule(backends={"v1": 100}, retries=Retries(attempts=1, per_try_timeout_ms=250)),),
        },
    )
    assert found(spec, "SM405") == ["route/front/0"]
    assert '"back" rules[0]' in next(f.message for f in lint_spec(spec) if f.code == "SM405")


def test_sm405_shared_service_timeout_is_reported_once() -> None:
    spec = make(
        {"front": Service(versions=("v1", "v2"), timeout_ms=1000), "back": Service(retries=FAST_RETRIES)},
        ("front", "back"),
        routes={"front": (Rule(backends={"v1": 100}, match=()),) + (Rule(backends={"v2": 100}),)},
    )
    assert found(spec, "SM405") == ["service/front"]


def test_sm406_retries_on_two_consecutive_hops() -> None:
    spec = make(
        {
            "front": Service(timeout_ms=10_000, retries=Retries(attempts=3, per_try_timeout_ms=1000)),
            "back": Service(retries=FAST_RETRIES),
        },
        ("front", "back"),
    )
    assert found(spec, "SM406") == ["service/front"]
    message = next(f.message for f in lint_spec(spec) if f.code == "SM406")
    assert "12 times (4 x 3)" in message and '"back"' in message


def test_sm406_passes_with_retries_on_one_hop_or_zero_attempts() -> None:
    one_hop = make({"front": Service(timeout_ms=5000), "back": Service(retries=FAST_RETRIES)}, ("front", "back"))
    zero = make(
        {"front": Service(retries=Retries(attempts=0)), "back": Service(retries=FAST_RETRIES)}, ("front", "back")
    )
    assert found(one_hop, "SM406") == [] and found(zero, "SM406") == []


def test_cycles_terminate_and_report_each_edge() -> None:
    retried = Service(timeout_ms=3000, retries=FAST_RETRIES)
    spec = make({"a": retried, "b": retried, "c": retried}, ("a", "b"), ("b", "c"), ("c", "a"), ("a", "a"))
    assert found(spec, "SM406") == ["service/a", "service/b", "service/c"]
    # each 500ms try of a caller is shorter than the callee's 1.5s of tries
    assert found(spec, "SM405") == ["service/a", "service/b", "service/c"]


def test_timeout_cycle_terminates_and_reports_only_the_shorter_caller() -> None:
    spec = make(
        {"a": Service(timeout_ms=100), "b": Service(timeout_ms=200)},
        ("a", "b"), ("b", "a"),
    )
    assert found(spec, "SM405") == ["service/a"]


def test_sm405_caller_per_try_timeout_shorter_than_callee_tries() -> None:
    front = Service(timeout_ms=5000, retries=Retries(attempts=1, per_try_timeout_ms=1000))
    spec = make({"front": front, "back": Service(retries=FAST_RETRIES)}, ("front", "back"))
    assert found(spec, "SM405") == ["service/front"]
    message = next(f.message for f in lint_spec(spec) if f.code == "SM405")
    assert 'each try of requests to "front" is cut off after 1s' in message
    longer = Service(timeout_ms=5000, retries=Retries(attempts=1, per_try_timeout_ms=2000))
    assert found(make({"front": longer, "back": Service(retries=FAST_RETRIES)}, ("front", "back")), "SM405") == []
