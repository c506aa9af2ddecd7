"""End to end: the receiving side (inbound listener): rate limiting, forwarding to the app."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.slow

RATE = 0.05
"""Tokens per second: one refill every 20 s, so a burst of requests sees only the bucket."""
BURST = 5

LIMITED = f"""
mesh(name = "e2e", mtls = "disable")
service(name = "limited", rate_limit = rate_limit({RATE}, burst = {BURST}))
"""


def test_rate_limit_counts_under_concurrency(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("limited", mesh.bundle(LIMITED), version="v1", app=app.address)

    n = 20
    started = time.monotonic()
    replies = h.many(proxy.inbound, n, "/limited", host="limited", concurrency=n)
    refilled = math.floor((time.monotonic() - started) * RATE)

    passed = [r for r in replies if r.status == 200]
    limited = [r for r in replies if r.status == 429]
    # The bucket starts full (burst tokens); at this rate nothing (or almost nothing) refills.
    assert BURST <= len(passed) <= BURST + refilled, Counter(r.status for r in replies)
    assert len(passed) + len(limited) == n
    assert all(r.app == "v1" for r in passed)
    for reply in limited:
        assert reply.error == "rate-limited"
        assert reply.app is None
        retry_after = reply.headers.get("retry-after")
        assert retry_after is not None and int(retry_after) >= 1, reply.headers
    # Only the admitted requests reached the app.
    assert app.count("GET /limited") == len(passed)


def test_inbound_forwards_method_path_query_and_body_to_the_app(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("limited", mesh.bundle(LIMITED), version="v1", app=app.address)

    reply = h.call(proxy.inbound, "/echo?a=1&b=two", host="limited", method="PUT", body=b"payload")

    assert (reply.status, reply.app) == (200, "v1")
    echoed = reply.json()
    assert (echoed["method"], echoed["path"], echoed["query"], echoed["body"]) == ("PUT", "/echo", "a=1&b=two", "payload")
    names = {k.lower() for k, _ in echoed["headers"]}
    assert "x-forwarded-for" in names
