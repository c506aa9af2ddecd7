"""DeadlineQueue: one loop timer per route, exact cancellation, and other cancellations passed on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from starmesh.runtime.filters.deadline import DeadlineQueue, running
from starmesh.runtime.filters.timeout import timeout_filter
from starmesh.runtime.message import FixedBody, Request, Response


def request() -> Request:
    return Request("GET", "/", None, [], FixedBody(b""), service="svc")


async def hang(request: Request) -> Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def quick(request: Request) -> Response:
    await asyncio.sleep(0)
    return Response(200, [], FixedBody(b""))


def test_expired_deadlines_cancel_only_their_own_tasks() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue()
        outcomes: dict[str, str] = {}

        async def work(name: str, seconds: float, duration: float) -> None:
            expiry = queue.start(loop, loop.time() + seconds)
            try:
                await asyncio.sleep(duration)
                outcomes[name] = "finished"
            except asyncio.CancelledError:
                outcomes[name] = "expired" if expiry.expired() else "cancelled"
            finally:
                expiry.finish()

        await asyncio.gather(work("slow", 0.02, 10), work("fast", 0.5, 0), work("slower", 0.03, 10))
        assert outcomes == {"slow": "expired", "fast": "finished", "slower": "expired"}
        assert len(queue) <= 3

    asyncio.run(main())


def test_an_earlier_deadline_out_of_order_gets_its_own_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue()
        late = queue.start(loop, loop.time() + 60)

        async def early() -> bool:
            expiry = queue.start(loop, loop.time() + 0.01)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                return expiry.expired()
            finally:
                expiry.finish()
            return False

        assert await asyncio.create_task(early())
        late.finish()

    asyncio.run(main())


def test_a_client_cancellation_is_not_turned_into_a_504() -> None:
    async def main() -> None:
        handler = timeout_filter(10_000)
        assert handler is not None
        task = asyncio.ensure_future(handler(hang)(request()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_timeouts_work_across_event_loops_and_leave_no_timer_armed() -> None:
    wrap = timeout_filter(20)
    assert wrap is not None
    handler = wrap(hang)
    fast = wrap(quick)
    for _ in range(2):  # a second asyncio.run: a new loop for the same route's queue

        async def main() -> None:
            response = await handler(request())
            assert (response.status, response.error) == (504, "timeout")
            assert (await fast(request())).status == 200
            assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

        asyncio.run(main())


def test_many_quick_requests_share_one_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue()
        for _ in range(1000):
            expiry = queue.start(loop, loop.time() + 5)
            expiry.finish()
        # Finished deadlines are dropped from the front as new ones start.
        assert len(queue) == 1

    asyncio.run(main())


def test_running_finds_the_current_loop_and_task_across_loops_and_threads() -> None:
    async def found() -> bool:
        loop, task = running()
        inner = await asyncio.get_running_loop().create_task(inner_found())
        return loop is asyncio.get_running_loop() and task is asyncio.current_task() and inner

    async def inner_found() -> bool:
        return running()[1] is asyncio.current_task()

    results = [asyncio.run(found()) for _ in range(2)]  # a new loop each time
    thread = threading.Thread(target=lambda: results.append(asyncio.run(found())))
    thread.start()
    thread.join()
    results.append(asyncio.run(found()))  # back on this thread, after the other one's loop
    assert results == [True, True, True, True]

    with pytest.raises(RuntimeError):
        running()  # no loop running here
