"""Micro-benchmark of the decision engine's hot path.

Builds a 1,000-service table (each service: a header rule, a regex rule, a prefix rule
with a query condition and a weighted catch-all, plus an authorization), then times
`DecisionTable.route()` and `DecisionTable.authorize()` for requests that win at
different rule positions. Prints nanoseconds per call (best of several repeats).

    .venv/bin/python bench/decide.py [--services N] [--number N]
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.spec import (
    Allow,
    Authorization,
    Match,
    MeshConfig,
    Retries,
    Rule,
    Service,
    Spec,
    StringMatch,
)

__all__ = ["build_spec", "main"]


def build_spec(services: int) -> Spec:
    """A spec with `services` services shaped like a real mesh's."""
    rules = (
        Rule(match=(Match(headers={"end-user": StringMatch(kind="exact", value="jason")}),), backends={"v2": 100}),
        Rule(match=(Match(path_regex="/items/[0-9]+", methods=("GET", "HEAD")),), backends={"v3": 100}, timeout_ms=500),
        Rule(match=(Match(path_prefix="/beta", query={"preview": StringMatch(kind="present")}),), backends={"v2": 100}),
        Rule(backends={"v1": 80, "v2": 15, "v3": 5}, retries=Retries(attempts=2, per_try_timeout_ms=200)),
    )
    names = [f"svc-{i:04d}" for i in range(services)]
    return Spec(
        mesh=MeshConfig(name="bench"),
        services={name: Service(versions=("v1", "v2", "v3"), timeout_ms=2000) for name in names},
        routes={name: rules for name in names},
        authorization={
            name: Authorization(rules=(Allow(sources=("frontend",), methods=("GET",), paths=("/items/*", "/health")),))
            for name in names
        },
    )


def _ns_per_call(fn: Callable[[], object], number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()

    spec = build_spec(args.services)
    start = time.perf_counter()
    table = DecisionTable.build(spec)
    build_ms = (time.perf_counter() - start) * 1000
    print(f"build: {args.services} services in {build_ms:.1f} ms")

    svc = f"svc-{args.services // 2:04d}"
    jason = {"end-user": "jason", "accept": "*/*"}
    plain = {"accept": "*/*", "user-agent": "wrk"}
    route = table.route
    cases: dict[str, Callable[[], object]] = {
        "route: rule 0 (header exact)": lambda: route(svc, "GET", "/items/1", jason),
        "route: rule 1 (regex + methods)": lambda: route(svc, "GET", "/items/42", plain),
        "route: rule 2 (prefix + query)": lambda: route(svc, "GET", "/beta/x?preview", plain),
        "route: rule 3 (catch-all)": lambda: route(svc, "POST", "/checkout", plain),
        "route: unknown service": lambda: route("nope", "GET", "/", plain),
        "authorize: allowed": lambda: table.authorize(svc, "frontend", "GET", "/items/7"),
        "authorize: denied": lambda: table.authorize(svc, "other", "GET", "/items/7"),
    }
    for label, fn in cases.items():
        print(f"{label:34s} {_ns_per_call(fn, args.number):8.0f} ns/call")


if __name__ == "__main__":
    main()
