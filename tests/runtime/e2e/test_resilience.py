"""End to end: retries, timeouts, circuit breaking and outlier ejection, counted at real apps."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.slow

RETRYING = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "flaky", timeout = "20s", retries = retries(attempts = 2, per_try_timeout = "10s"))
"""


def test_retries_are_counted_at_the_upstream_and_the_last_answer_returned(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(RETRYING), mesh.endpoints({"flaky": {"v1": [app.address]}}))

    reply = h.call(proxy.outbound, "/status/503", host="flaky")

    # attempts = 2: the first try and two retries reach the app.
    assert app.count("GET /status/503") == 3
    # Tries ran out: the caller gets the app's last 503 as it was, not one the proxy made.
    assert reply.status == 503
    assert reply.error is None
    assert reply.app == "v1"
    assert reply.body == b"v1 says 503\n"


def test_success_is_not_retried(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(RETRYING), mesh.endpoints({"flaky": {"v1": [app.address]}}))

    replies = h.many(proxy.outbound, 10, "/fine", host="flaky")

    assert [r.status for r in replies] == [200] * 10
    assert app.count("GET /fine") == 10


def test_post_is_not_retried_after_it_reached_the_upstream(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(RETRYING), mesh.endpoints({"flaky": {"v1": [app.address]}}))

    post = h.call(proxy.outbound, "/reset", host="flaky", method="POST", body=b"order=1")
    get = h.call(proxy.outbound, "/reset", host="flaky")

    # The app read the POST and reset the connection: the POST may have had effects, so
    # it is tried once; the GET is idempotent and tried attempts + 1 times.
    assert app.count("POST /reset") == 1
    assert app.count("GET /reset") == 3
    assert (post.status, post.error) == (503, "upstream-reset")
    assert (get.status, get.error) == (503, "upstream-reset")

    # A 5xx answer to a POST is not retried either: it reached the upstream.
    post_503 = h.call(proxy.outbound, "/status/503", host="flaky", method="POST", body=b"x")
    assert (post_503.status, post_503.error) == (503, None)
    assert app.count("POST /status/503") == 1


TIMEOUTS = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "slow")
http_route("slow", rules = [
    rule(match = [match(path_prefix = "/pertry")], timeout = "20s",
         retries = retries(attempts = 2, per_try_timeout = "200ms")),
    rule(match = [match(path_prefix = "/overall")], timeout = "300ms"),
    rule(match = [match(path_prefix = "/both")], timeout = "500ms",
         retries = retries(attempts = 5, per_try_timeout = "10s")),
])
"""


def test_per_try_and_overall_timeouts_leave_no_sockets_behind(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    proxy = mesh.proxy("frontend", mesh.bundle(TIMEOUTS), mesh.endpoints({"slow": {"v1": [app.address]}}))
    baseline_sockets = proxy.open_sockets()
    slow = {"x-app-delay-ms": "5000"}

    # per_try_timeout cuts each try off; the overall timeout (20s) is far away: 3 tries.
    per_try = h.call(proxy.outbound, "/pertry", host="slow", headers=slow)
    assert app.count("GET /pertry") == 3
    # No try answered in time: the proxy answers 504 timeout itself.
    assert (per_try.status, per_try.error) == (504, "timeout")

    # No retries: the overall timeout ends the one try.
    overall = h.call(proxy.outbound, "/overall", host="slow", headers=slow)
    assert (overall.status, overall.error) == (504, "timeout")
    assert app.count("GET /overall") == 1

    # Many retries allowed, but one try outlives the whole request's timeout.
    both = h.call(proxy.outbound, "/both", host="slow", headers=slow)
    assert (both.status, both.error) == (504, "timeout")
    assert app.count("GET /both") == 1

    # Every cut-off try's connection to the app is closed (it cannot be reused with an
    # answer still pending), and the proxy holds no more sockets than before.
    h.poll_until(lambda: proxy.connections_to(app.port) == 0, "proxy connections to the slow app closed")
    h.poll_until(lambda: proxy.open_sockets() <= baseline_sockets, "proxy back to its baseline socket count")

    # And it still serves, keeping the answered connection for reuse (which shows the
    # connection count above measured something).
    assert h.call(proxy.outbound, "/overall", host="slow").status == 200
    assert proxy.connections_to(app.port) == 1


def test_circuit_breaker_overflow_under_concurrency(mesh: Any, h: Any) -> None:
    app = mesh.app("v1")
    bundle = mesh.bundle(
        """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(name = "guarded", circuit_breaker = circuit_breaker(max_requests = 4, max_pending_requests = 1))
"""
    )
    proxy = mesh.proxy("frontend", bundle, mesh.endpoints({"guarded": {"v1": [app.address]}}))

    active, pending, extra = 4, 1, 3
    # Each admitted request holds its slot for 1s at the app; all are sent at once:
    # 4 are admitted, 1 waits for a slot (and gets it when the first ones finish), the
    # rest overflow at once.
    replies = h.many(
        proxy.outbound,
        active + pending + extra,
        "/held",
        host="guarded",
        headers={"x-app-delay-ms": "1000"},
        concurrency=active + pending + extra,
    )

    outcomes = Counter((r.status, r.error) for r in replies)
    assert outcomes == {(200, None): active + pending, (503, "overflow"): extra}, outcomes
    assert app.count("GET /held") == active + pending
    # Nothing stays queued: once the slots free up, requests pass again.
    assert h.call(proxy.outbound, "/after", host="guarded").status == 200


OUTLIERS = """
mesh(name = "e2e", mtls = "disable")
service(name = "frontend")
service(
    name = "pool",
    load_balancer = "round_robin",
    outlier_detection = outlier_detection(
        consecutive_5xx = 3, interval = "100ms", base_ejection_time = "2s", max_ejection_percent = 50),
)
"""


def test_failing_endpoint_is_ejected_and_readmitted(mesh: Any, h: Any) -> None:
    good = mesh.app("good")
    bad = mesh.app("bad", status=503)
    proxy = mesh.proxy("frontend", mesh.bundle(OUTLIERS), mesh.endpoints({"pool": {"v1": [good.address, bad.address]}}))

    async def sequential(n: int) -> list[Any]:
        return list(await h.send_all(proxy.outbound, [h.Call("/x", "pool")] * n, 1))

    # Round robin over two endpoints: after 3 consecutive 5xx the bad one is ejected
    # and, within its ejection time, every further request goes to the good one.
    first = asyncio.run(sequential(30))
    failures = [r for r in first if r.status == 503]
    assert bad.count("GET /x") == 3, bad.stats()
    assert len(failures) == 3
    assert all(r.app == "bad" and r.error is None for r in failures)
    assert Counter(r.app for r in first) == {"good": 27, "bad": 3}

    # The endpoint recovers; after base_ejection_time it is tried again and gets traffic.
    bad.force_status(None)

    def readmitted() -> bool:
        reply = h.call(proxy.outbound, "/probe", host="pool")
        assert reply.status == 200, reply
        return bool(bad.count("GET /probe") > 0)

    h.poll_until(readmitted, "the healed endpoint is tried again", deadline=20.0, interval=0.1)
    after = asyncio.run(sequential(20))
    assert all(r.status == 200 for r in after)
    shares = Counter(r.app for r in after)
    assert shares["bad"] >= 5, shares
    assert shares["good"] >= 5, shares
