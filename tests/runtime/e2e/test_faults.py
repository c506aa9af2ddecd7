"""End to end: fault injection percentages, counted at the client and at the app."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.slow

DELAY_S = 1.0

FAULTS = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "faulty")
http_route("faulty", rules = [
    rule(match = [match(path_prefix = "/abort")], fault = fault(abort_status = 418, abort_percent = 30)),
    rule(match = [match(path_prefix = "/delay")], fault = fault(delay = "1s", delay_percent = 50)),
])
"""


def test_abort_percent_within_binomial_tolerance(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(FAULTS), mesh.endpoints({"faulty": {"v1": [app.address]}}))

    n = 1000
    replies = h.many(proxy.outbound, n, "/abort", host="faulty", concurrency=32)

    outcomes = Counter((r.status, r.error, r.app) for r in replies)
    aborted = outcomes[(418, "fault", None)]
    assert aborted + outcomes[(200, None, "v1")] == n, outcomes
    ok, why = h.binomial_ok(aborted, n, 0.30)
    assert ok, why
    # Aborted requests never reach the app; the others all do.
    assert app.count("GET /abort") == n - aborted


def test_delay_percent_within_binomial_tolerance(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(FAULTS), mesh.endpoints({"faulty": {"v1": [app.address]}}))

    n = 100
    replies = h.many(proxy.outbound, n, "/delay", host="faulty", concurrency=n)

    # Every request still reaches the app and succeeds; a delayed one cannot take less
    # than the delay, and an undelayed one (100 in flight on loopback) takes far less.
    assert [(r.status, r.app) for r in replies] == [(200, "v1")] * n
    assert app.count("GET /delay") == n
    delayed = sum(1 for r in replies if r.elapsed >= DELAY_S)
    ok, why = h.binomial_ok(delayed, n, 0.50)
    assert ok, why
