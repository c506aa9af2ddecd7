"""Request bodies a retry can send again.

A complete body (`complete()` is not None: the common case) is simply sent again as a
`FixedBody`. A streamed body is recorded as the first try reads it, up to
`REPLAY_LIMIT` bytes; a later try replays what was recorded, then reads on from the
source. A body larger than the bound is not replayable: the request gets no retry.
"""

from __future__ import annotations

from starmesh.runtime.message import Body

__all__ = ["REPLAY_LIMIT", "ReplayBody", "Recording"]

REPLAY_LIMIT = 64 * 1024
"""The most bytes of a streamed request body kept so that a retry can resend it."""


class Recording:
    """The chunks of a streamed body read so far (until it outgrows `limit`)."""

    __slots__ = ("source", "chunks", "size", "limit", "eof", "overflowed")

    def __init__(self, source: Body, limit: int = REPLAY_LIMIT) -> None:
        self.source = source
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.eof = False
        self.overflowed = False

    @property
    def replayable(self) -> bool:
        """Whether a new try can still send the whole body."""
        return not self.overflowed

    def body(self) -> ReplayBody:
        """A body for one try: the recorded chunks, then the rest of the source."""
        return ReplayBody(self)


class ReplayBody:
    """One try's view of a `Recording` (a `Body`)."""

    __slots__ = ("_recording", "_pos", "length")

    def __init__(self, recording: Recording) -> None:
        self._recording = recording
        self._pos = 0
        self.length = recording.source.length

    def complete(self) -> bytes | None:
        recording = self._recording
        if recording.eof and not recording.overflowed and self._pos == 0:
            return b"".join(recording.chunks)
        return None

    async def read(self) -> bytes:
        recording = self._recording
        if not recording.overflowed and self._pos < len(recording.chunks):
            chunk = recording.chunks[self._pos]
            self._pos += 1
            return chunk
        if recording.eof:
            return b""
        chunk = await recording.source.read()
        if not chunk:
            recording.eof = True
            return b""
        if not recording.overflowed:
            recording.size += len(chunk)
            if recording.size > recording.limit:
                recording.overflowed = True
                recording.chunks.clear()
            else:
                recording.chunks.append(chunk)
                self._pos += 1
        return chunk

    def close(self) -> None:
        """Nothing to release: the source stays with the request for a next try."""
