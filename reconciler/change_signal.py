"""`ChangeSignal`: wake every long-poll waiting for a change, from any thread.

    long-poll ─► await signal.wait(timeout) ──┐   (one future per waiter, on its own loop)
    long-poll ─► await signal.wait(timeout) ──┤
                                              ▼
    a change ──► signal.notify() ── wakes all of them at once; later waiters wait for the next

The registry's endpoint table and the rollout's releases each own one: a waiter parks
until the next `notify` or its timeout, then reads the new state itself (a wake-up says
only "look again", so a missed or extra one costs a read). Each waiter's future belongs
to its own event loop and `notify` wakes it there (directly on the running loop,
`call_soon_threadsafe` elsewhere), so one signal serves callers from several loops and
threads (tests run one `asyncio.run` after another).
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["ChangeSignal"]


class ChangeSignal:
    """Wakes every waiter at once when something changed; `notify` is safe from any thread.

    Each waiter parks on a future of its own event loop, so one signal serves callers
    from several loops (tests run one `asyncio.run` after another)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, set()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for future in waiters:
            loop = future.get_loop()
            if loop is running:
                _wake(future)
            elif not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_wake, future)
                except RuntimeError:  # the loop closed meanwhile: nobody is waiting there
                    pass

    async def wait(self, timeout: float) -> bool:
        """Wait for the next `notify`, at most `timeout` seconds; True when notified."""
        if timeout <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiters.add(future)
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            return bool(done)
        finally:
            with self._lock:
                self._waiters.discard(future)
            future.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
