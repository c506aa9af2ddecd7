"""Split, fault injection, header mutation and mirroring, with a seeded rng and a recording upstream."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import Fault, MeshConfig, Mirror, Rule, Service, Spec
from starmesh.runtime.chain import ChainDeps, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.message import FixedBody, Handler, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.telemetry import MemoryRecorder

ENDPOINTS = {"v1": ("10.0.0.1:80",), "v2": ("10.0.0.2:80",)}


class Pool:
    """Records (endpoint, host, headers); mirror copies (host *-shadow) may wait on `shadow_gate`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, list[tuple[str, str]], bytes]] = []
        self.shadow_gate: asyncio.Event | None = None

    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        self.calls.append((endpoint, host, list(request.headers), request.body.complete() or b""))
        if host is not None and host.endswith("-shadow") and self.shadow_gate is not None:
            await self.shadow_gate.wait()
        return Response(200, [("x-from", endpoint)], FixedBody(b"hello"), endpoint=endpoint)

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass

    def primary(self) -> list[str]:
        return [c[0] for c in self.calls if c[1] is None]

    def shadow(self) -> list[tuple[str, str | None, list[tuple[str, str]], bytes]]:
        return [c for c in self.calls if c[1] is not None]


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make(pool: Pool, rule: Rule, *, seed: int = 7, sleep: Sleeps | None = None, state: StateRegistry | None = None,
         recorder: MemoryRecorder | None = None, **svc: Any) -> Handler:
    service = Service(versions=("v1", "v2"), **svc)
    spec = Spec(mesh=MeshConfig(name="m"), services={"svc": service}, routes={"svc": (rule,)})
    prepared: PreparedService = prepare_service("svc", service, (rule,), None, spec)
    deps = ChainDeps(
        pool=pool,
        endpoints=Endpoints({"svc": ENDPOINTS}),
        state=state or StateRegistry(),
        recorder=recorder or MemoryRecorder(),
        local_service="caller",
        rng=random.Random(seed),
        sleep=sleep or Sleeps(),
    )
    return build_outbound(prepared, prepared.rules[0], deps)


def request(headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> Request:
    return Request("POST", "/p", "q=1", headers or [("host", "svc")], FixedBody(body), service="svc")


def send_many(handler: Handler, n: int) -> list[Response]:
    async def main() -> list[Response]:
        out = []
        for _ in range(n):
            out.append(await handler(request()))
            await asyncio.sleep(0)  # let mirror copies run
        await asyncio.sleep(0)
        return out

    return asyncio.run(main())


def within(count: int, n: int, p: float) -> bool:
    """Within 4.5 standard deviations of a binomial(n, p) mean."""
    sd: float = (n * p * (1 - p)) ** 0.5
    return abs(count - n * p) <= 4.5 * sd


def test_split_90_10_within_binomial_tolerance_and_labelled() -> None:
    pool = Pool()
    recorder = MemoryRecorder()
    send_many(make(pool, Rule(backends={"v1": 90, "v2": 10}), recorder=recorder), 4000)
    hits = Counter(pool.primary())
    assert within(hits["10.0.0.2:80"], 4000, 0.10), hits
    assert hits["10.0.0.1:80"] + hits["10.0.0.2:80"] == 4000
    assert recorder.requests_total(destination_version="v2") == hits["10.0.0.2:80"]
    assert recorder.requests_total(direction="outbound", source_service="caller", destination_service="svc") == 4000


def test_abort_percentage_within_binomial_tolerance() -> None:
    pool = Pool()
    responses = send_many(make(pool, Rule(fault=Fault(abort_status=418, abort_percent=25))), 4000)
    aborted = [r for r in responses if r.status == 418]
    assert all(r.error == "fault" and dict(r.headers)["x-starmesh-error"] == "fault" for r in aborted)
    assert within(len(aborted), 4000, 0.25), len(aborted)
    assert len(pool.calls) == 4000 - len(aborted)


def test_delay_then_abort_drawn_independently() -> None:
    pool = Pool()
    sleeps = Sleeps()
    rule = Rule(fault=Fault(delay_ms=200, delay_percent=50, abort_status=503, abort_percent=30))
    handler = make(pool, rule, sleep=sleeps)
    outcomes: Counter[tuple[bool, bool]] = Counter()

    async def main() -> None:
        for _ in range(4000):
            before = len(sleeps.calls)
            response = await handler(request())
            outcomes[(len(sleeps.calls) > before, response.error == "fault")] += 1

    asyncio.run(main())
    assert set(sleeps.calls) == {0.2}
    assert within(outcomes[(True, False)] + outcomes[(True, True)], 4000, 0.5)
    assert within(outcomes[(False, True)] + outcomes[(True, True)], 4000, 0.3)
    assert within(outcomes[(True, True)], 4000, 0.15)  # independent: 0.5 x 0.3
    assert len(pool.calls) == outcomes[(False, False)] + outcomes[(True, False)]


def test_a_delay_past_the_timeout_ends_at_the_timeout() -> None:
    pool = Pool()
    sleeps = Sleeps()
    rule = Rule(fault=Fault(delay_ms=5000, delay_percent=100), timeout_ms=1000)
    [response] = send_many(make(pool, rule, sleep=sleeps), 1)
    assert (response.status, response.error) == (504, "timeout")
    assert len(sleeps.calls) == 1 and 0.99 <= sleeps.calls[0] <= 1.0
    assert pool.calls == []


def test_a_delay_counts_against_the_timeout() -> None:
    async def main() -> Request:
        pool = Pool()
        rule = Rule(fault=Fault(delay_ms=300, delay_percent=100), timeout_ms=1000)
        handler = make(pool, rule)
        req = request()
        started = asyncio.get_running_loop().time()
        await handler(req)
        assert req.deadline is not None and req.deadline <= started + 1.0 + 0.05
        return req

    asyncio.run(main())


def test_headers_are_set_and_removed_case_insensitively() -> None:
    pool = Pool()
    rule = Rule(set_request_headers={"X-Env": "canary", "X-Keep": "new"}, remove_request_headers=("X-Debug",))
    handler = make(pool, rule)

    async def main() -> None:
        await handler(request([("host", "svc"), ("x-debug", "1"), ("x-keep", "old"), ("x-keep", "older"), ("accept", "*/*")]))

    asyncio.run(main())
    [(_, _, headers, _)] = pool.calls
    assert headers == [("host", "svc"), ("accept", "*/*"), ("x-env", "canary"), ("x-keep", "new")]


def test_mirror_goes_to_the_shadow_while_the_answer_comes_from_the_primary() -> None:
    async def main() -> None:
        pool = Pool()
        pool.shadow_gate = asyncio.Event()
        recorder = MemoryRecorder()
        handler = make(pool, Rule(backends={"v1": 100}, mirror=Mirror(version="v2")), recorder=recorder)
        response = await handler(request(body=b"payload"))
        # The answer is the primary's, even though the mirror has not been answered.
        assert dict(response.headers)["x-from"] == "10.0.0.1:80"
        await asyncio.sleep(0)
        [(endpoint, host, headers, body)] = pool.shadow()
        assert (endpoint, host, body) == ("10.0.0.2:80", "svc-shadow", b"payload")
        assert ("host", "svc-shadow") in headers and ("host", "svc") not in headers
        pool.shadow_gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())


def test_mirror_copies_past_the_bound_are_dropped_and_counted() -> None:
    async def main() -> None:
        pool = Pool()
        pool.shadow_gate = asyncio.Event()
        recorder = MemoryRecorder()
        state = StateRegistry(mirror_limit=3)
        handler = make(pool, Rule(backends={"v1": 100}, mirror=Mirror(version="v2")), state=state, recorder=recorder)
        responses = [await handler(request()) for _ in range(10)]
        assert all(r.status == 200 for r in responses)
        await asyncio.sleep(0)
        assert len(pool.shadow()) == 3 and len(state.mirrors.tasks) == 3
        assert recorder.mirror_drops == {"svc": 7}
        assert "starmesh_mirror_dropped_total{destination_service=\"svc\"} 7" in recorder.render()
        pool.shadow_gate.set()
        while state.mirrors.tasks:
            await asyncio.sleep(0)

    asyncio.run(main())


def test_mirror_percent_and_streamed_bodies() -> None:
    pool = Pool()
    recorder = MemoryRecorder()
    send_many(make(pool, Rule(mirror=Mirror(version="v2", percent=20)), recorder=recorder), 2000)
    assert within(len(pool.shadow()), 2000, 0.2)
    assert not recorder.mirror_drops

    class Streamed(FixedBody):
        def complete(self) -> bytes | None:  # type: ignore[override]
            return None

    async def main() -> None:
        pool2 = Pool()
        recorder2 = MemoryRecorder()
        handler = make(pool2, Rule(mirror=Mirror(version="v2")), recorder=recorder2)
        await handler(Request("GET", "/", None, [], Streamed(b"x"), service="svc"))
        await asyncio.sleep(0)
        assert pool2.shadow() == [] and recorder2.mirror_drops == {"svc": 1}

    asyncio.run(main())
