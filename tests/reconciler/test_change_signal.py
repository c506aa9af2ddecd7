"""ChangeSignal: one signal wakes waiters on several event loops, notified from any thread."""

from __future__ import annotations

import asyncio
import threading

from starmesh.reconciler.change_signal import ChangeSignal


def test_the_change_signal_serves_several_event_loops_and_threads() -> None:
    signal = ChangeSignal()

    async def wait_for_thread() -> bool:
        thread = threading.Timer(0.05, signal.notify)  # notified from another thread
        thread.start()
        try:
            return await signal.wait(30)
        finally:
            thread.join()

    assert asyncio.run(wait_for_thread()) is True
    assert asyncio.run(wait_for_thread()) is True  # a second loop: no "bound to a different loop"
    assert asyncio.run(signal.wait(0.01)) is False
    assert asyncio.run(signal.wait(0)) is False
