"""Cheap per-request deadlines: one loop timer per queue instead of one per request.

`asyncio.timeout` costs several microseconds per request (a Timeout object, a timer
handle scheduled and cancelled). A route's deadlines all have the same length, so
they expire in the order they start: a `DeadlineQueue` keeps them in a deque and
holds one loop timer for the oldest. Finished requests are dropped from the front as
new ones start; when the timer fires it cancels the tasks whose deadline passed and
re-arms for the next one. A deadline that would expire before the newest queued one
(an earlier deadline inherited from an outer filter) gets its own timer.

Use it like `asyncio.timeout_at`, minus the context manager:

    loop, task = running()         # once per request: no get_running_loop() (a getpid)
    expiry = queue.start(loop, when, task)
    try:
        response = await inner(request)
    except asyncio.CancelledError:
        if expiry.expired():       # ours: the deadline passed
            ...answer the timeout...
        raise
    finally:
        expiry.finish()
    if expiry.expired(): ...       # the inner code swallowed the cancellation
"""

from __future__ import annotations

import asyncio
import asyncio.tasks
from collections import deque
from asyncio import current_task
from collections.abc import Callable
from threading import get_ident
from typing import Any

import msgspec

__all__ = ["DeadlineQueue", "Expiry", "running"]


_last: tuple[asyncio.AbstractEventLoop | None, int] = (None, 0)
"""The loop `running()` found last and the thread that runs it: one tuple, so a reader
never sees one thread's loop paired with another's id."""


def _task_lookup() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    """`asyncio.current_task(loop)` without its Python frame: the C dict's `get` when present.

    On Python 3.11 `current_task` is a Python function around `_current_tasks.get(loop)`;
    calling the dict's bound `get` directly halves `running()`'s cost. Falls back to
    `current_task` where asyncio keeps the map elsewhere."""
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(tasks, dict):
        get: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = tasks.get
        return get
    return current_task


_current = _task_lookup()


def running() -> tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]:
    """The running event loop and the task running the caller (once per request).

    `asyncio.get_running_loop()` costs a getpid() system call per call on Python 3.11
    (it checks for a fork). So the loop found last is kept and checked with
    `asyncio.current_task(loop)`, a dict lookup: a loop runs in one thread and another
    loop cannot run in that thread while it runs, so when the caller is on that thread
    and the loop has a task in progress, that task is the caller's."""
    global _last
    loop, thread = _last
    if loop is not None and get_ident() == thread:
        task = _current(loop)
        if task is not None:
            return loop, task
    loop = asyncio.get_running_loop()
    task = current_task(loop)
    if task is None:
        raise RuntimeError("a deadline needs a running task")
    _last = (loop, get_ident())
    return loop, task


class Expiry(msgspec.Struct):
    """One request's deadline in a queue.

    `base` is the task's `cancelling()` count when the deadline started. `fired` is 0
    (not fired), 1 (fired: the task was cancelled) or 2 (fired, and `expired()` took
    the cancellation back). A msgspec Struct: two are built per request, and its C
    constructor costs half of a Python `__init__`."""

    when: float
    task: asyncio.Task[Any]
    base: int
    active: bool = True
    fired: int = 0

    def fire(self) -> None:
        if self.active:
            self.fired = 1
            self.task.cancel()

    def expired(self) -> bool:
        """True when this deadline cancelled the task and no other cancellation is pending.

        Takes back this deadline's cancellation (`Task.uncancel`) the first time it is
        asked, like `asyncio.timeout` does."""
        fired = self.fired
        if not fired:
            return False
        if fired == 1:
            self.fired = 2
            return self.task.uncancel() <= self.base
        return self.task.cancelling() <= self.base

    def finish(self) -> None:
        """The request is done with its deadline."""
        self.active = False


class _TimedExpiry(Expiry):
    """A deadline earlier than the queue's newest: it has a loop timer of its own."""

    handle: asyncio.TimerHandle | None = None

    def finish(self) -> None:
        self.active = False
        if self.handle is not None:
            self.handle.cancel()


class DeadlineQueue:
    """Deadlines of one length (one route's timeout, or per-try timeout), one timer."""

    __slots__ = ("_queue", "_loop", "_timer")

    def __init__(self) -> None:
        self._queue: deque[Expiry] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, when: float, task: asyncio.Task[Any] | None = None) -> Expiry:
        """Cancel `task` (default: the current task) at loop time `when` unless `finish` comes first."""
        if task is None:
            task = running()[1]
        queue = self._queue
        if self._loop is not loop:  # a new event loop (tests run several): start over
            queue.clear()
            self._loop = loop
            self._timer = None
        while queue and not queue[0].active:
            queue.popleft()
        if queue and when < queue[-1].when:
            timed = _TimedExpiry(when, task, task.cancelling())
            timed.handle = loop.call_at(when, timed.fire)
            return timed
        expiry = Expiry(when, task, task.cancelling())
        queue.append(expiry)
        if self._timer is None:
            self._timer = loop.call_at(when, self._expire)
        return expiry

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        queue = self._queue
        while queue and (not queue[0].active or queue[0].when <= now):
            queue.popleft().fire()
        if queue:
            self._timer = loop.call_at(queue[0].when, self._expire)

    def __len__(self) -> int:
        return len(self._queue)
