"""Bodies that arrive over a socket: streamed chunk by chunk, with flow control.

    protocol.data_received ──feed()──► StreamBody ──read()──► the chain / the other side
           ▲                               │
           └── pause_body / resume_body ◄──┘  (above HIGH_WATER buffered / below LOW_WATER)

The listener (request bodies) and the upstream client (response bodies) each own a
`BodySource`; a body asks its source to stop reading the socket when it has buffered
more than HIGH_WATER bytes and to resume once the reader drains it below LOW_WATER, so
a slow reader never makes the proxy buffer without bound.

Bodies that arrive whole in the same read as their head never become a StreamBody: the
protocols hand out a `FixedBody` (runtime/message.py) instead, the fast path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

__all__ = ["HIGH_WATER", "LOW_WATER", "BodySource", "StreamBody"]

HIGH_WATER = 256 * 1024
"""Buffered bytes above which the body's source stops reading its socket."""

LOW_WATER = 64 * 1024
"""Buffered bytes below which a paused source reads again."""


class BodySource(Protocol):
    """The connection a StreamBody is fed from."""

    def pause_body(self) -> None:
        """Stop reading the socket: the body's buffer is full."""

    def resume_body(self) -> None:
        """Read the socket again: the body's buffer drained."""

    def body_reading(self, body: StreamBody) -> None:
        """The body's reader asked for data for the first time (e.g. send 100 Continue)."""

    def body_closed(self, body: StreamBody) -> None:
        """The body was closed before its end: what is left of it will never be read."""


class StreamBody:
    """A body fed by a protocol's callbacks and read by one consumer, front to back.

    `feed` buffers a chunk, `finish` marks the end, `fail` records an error that `read`
    raises once the buffered chunks are gone. `complete()` returns the whole body when
    it has all arrived and nothing has been read yet (so a sender can write it at once,
    or replay it).
    """

    __slots__ = (
        "length",
        "_source",
        "_chunks",
        "_buffered",
        "_done",
        "_error",
        "_waiter",
        "_paused",
        "_started",
        "_closed",
        "_whole",
    )

    def __init__(self, length: int | None, source: BodySource, chunks: list[bytes] | None = None) -> None:
        self.length = length
        self._source = source
        self._chunks: deque[bytes] = deque(chunks) if chunks else deque()
        self._buffered = sum(map(len, self._chunks))
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._started = False
        self._closed = False
        self._whole: bytes | None = None

    @property
    def done(self) -> bool:
        """True once the last byte has arrived (or the body failed or was closed)."""
        return self._done or self._error is not None or self._closed

    # -- the source's side ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Buffer a chunk that arrived; pause the source above HIGH_WATER."""
        if self._closed:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._source.pause_body()
        self._wake()

    def finish(self) -> None:
        """The body's last byte has arrived."""
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body cannot complete; `read` raises `exc` once the buffer is empty."""
        if not self._done and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the reader's side (runtime.message.Body) ---------------------------------

    def complete(self) -> bytes | None:
        if self._whole is not None:
            return self._whole
        if not self._done or self._started or self._error is not None or self._closed:
            return None
        whole = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._whole = whole
        return whole

    async def read(self) -> bytes:
        if self._whole is not None:
            # complete() handed the bytes out; read() still yields them once.
            whole, self._whole = self._whole, None
            self._chunks.clear()
            self._buffered = 0
            self._started = True
            return whole
        if not self._started:
            self._started = True
            self._source.body_reading(self)
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done or self._closed:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and not self._done:
            self._paused = False
            self._source.resume_body()
        return data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        self._whole = None
        finished = self._done and self._error is None
        self._wake()
        if not finished:
            self._source.body_closed(self)
