"""Access logs: one JSON line per request, capped, queued, written off the event loop.

    telemetry filter ── admit(now, rate) ──► token bucket (mesh(access_log(max_lines_per_second)))
                     ── put(AccessEntry) ──► bounded deque (10,000) ──► writer thread ──► file | stdout

The request path does two cheap things: a token-bucket check (is there room for a line
this second?) and, when there is, an append of a tuple of the values it already holds.
A line over the cap, or one that finds the queue full, is dropped and counted in
`dropped` (`starmesh_access_log_dropped_total`). Formatting (JSON via msgspec, the RFC
3339 time) and writing happen in one writer thread, which sleeps until a line is queued
and then writes every 200 ms (sooner when the queue is half full) while lines keep
coming, so an idle proxy's writer never wakes, a slow disk delays lines, never requests,
and memory stays bounded however many requests arrive.

A file target is appended to and rotated at `rotate_bytes` (10 MiB): the current file
becomes `NAME.1` (replacing the previous one), so the disk use stays under twice that.
`-` writes to standard output.

A line, with the fields Envoy users look for (Envoy's names where it has one):

    {"time": "2025-01-02T03:04:05.678Z", "direction": "outbound", "method": "GET",
     "path": "/reviews/1", "protocol": "HTTP/1.1", "status": 200, "reason": "",
     "service": "reviews", "upstream": "127.0.0.1:15006", "upstream_version": "v2",
     "route": "route/reviews/0 mesh.star:12", "duration_ms": 1.234,
     "bytes_received": 0, "bytes_sent": 512, "trace_id": "4bf9…", "source": "productpage",
     "request_id": "…", "authority": "reviews", "user_agent": "curl/8.5.0"}

`time` is when the request arrived; `duration_ms` runs to the response head, and the
byte counts are the bodies' declared lengths (Content-Length) at that moment, null when
a body is chunked (the proxy streams it and does not count it). `path` excludes the
query string and is cut at 1,024 characters. Inbound lines whose request audit-mode
authorization would deny carry `"would_deny": true`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec

__all__ = ["MAX_FIELD", "AccessEntry", "AccessLog", "open_access_log", "render"]

log = logging.getLogger("starmesh.proxy")

MAX_FIELD = 1024
"""Characters kept of a path, user agent or request id (the rest is cut)."""

_encode = msgspec.json.Encoder().encode


class AccessEntry(NamedTuple):
    """What the request path hands the writer: values it holds anyway, formatted later."""

    started: float
    """Wall-clock seconds since the epoch when the request arrived."""
    direction: str
    method: str
    path: str
    protocol: str
    status: int
    reason: str
    service: str
    upstream: str
    upstream_version: str
    route: str
    duration: float
    """Seconds to the response head."""
    bytes_received: int | None
    bytes_sent: int | None
    trace_id: str | None
    source: str | None
    request_id: str | None
    authority: str
    user_agent: str | None
    would_deny: bool = False


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(entry: AccessEntry) -> bytes:
    """One JSON line (with its newline)."""
    line: dict[str, object] = {
        "time": _time(entry.started),
        "direction": entry.direction,
        "method": entry.method,
        "path": entry.path[:MAX_FIELD],
        "protocol": entry.protocol,
        "status": entry.status,
        "reason": entry.reason,
        "service": entry.service,
        "upstream": entry.upstream or None,
        "upstream_version": entry.upstream_version or None,
        "route": entry.route or None,
        "duration_ms": round(entry.duration * 1000.0, 3),
        "bytes_received": entry.bytes_received,
        "bytes_sent": entry.bytes_sent,
        "trace_id": entry.trace_id,
        "source": entry.source,
        "request_id": entry.request_id[:MAX_FIELD] if entry.request_id is not None else None,
        "authority": entry.authority[:MAX_FIELD],
        "user_agent": entry.user_agent[:MAX_FIELD] if entry.user_agent is not None else None,
    }
    if entry.would_deny:
        line["would_deny"] = True
    return _encode(line) + b"\n"


class AccessLog:
    """The proxy's access log: a token bucket, a bounded queue and a writer thread.

    `target` is a file path or "-" (standard output). `admit` and `put` run on the event
    loop; everything else in the writer thread, started by `start` and stopped (after
    writing what is queued) by `close`. `dropped` counts lines not written: over the
    cap, queue full, or lost to a write error."""

    def __init__(
        self,
        target: Path | str,
        *,
        max_queue: int = 10_000,
        rotate_bytes: int = 10 * 1024 * 1024,
        interval: float = 0.2,
    ) -> None:
        self.target = target
        self.max_queue = max_queue
        self.rotate_bytes = rotate_bytes
        self._interval = interval
        self._queue: deque[AccessEntry] = deque()
        self._wake_at = max(1, max_queue // 2)
        self._wake = threading.Event()  # set by `put` on the first line after a drain (and at half full)
        self._closing = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._refused = 0  # event-loop thread only: over the cap or queue full
        self._lost = 0  # writer thread only: write errors
        self._rate = -1
        self._tokens = 0.0
        self._last = 0.0
        self.written = 0
        """Lines written so far (writer thread)."""

    @property
    def dropped(self) -> int:
        """Lines dropped so far: over `max_lines_per_second`, the queue full, or a write error."""
        return self._refused + self._lost

    def admit(self, now: float, rate: int) -> bool:
        """Whether a line fits under `rate` lines per second at `now` (monotonic seconds).

        A token bucket holding one second's worth, full at the start and whenever the
        rate changes (a new bundle); a refusal counts as dropped."""
        if rate != self._rate:
            self._rate = rate
            self._tokens = float(rate)
            self._last = now
        tokens = self._tokens + (now - self._last) * rate
        if tokens > rate:
            tokens = float(rate)
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            self._refused += 1
            return False
        self._tokens = tokens - 1.0
        return True

    def put(self, entry: AccessEntry) -> None:
        """Queue a line for the writer; dropped (and counted) when the queue is full."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self._refused += 1
            return
        queue.append(entry)
        waiting = len(queue)
        if waiting == 1 or waiting == self._wake_at:
            self._wake.set()

    # -- the writer ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._closing.clear()
            self._thread = threading.Thread(target=self._run, name="starmesh-access-log", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer (waits up to `timeout` seconds)."""
        self._stopping = True
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            log.info("access log %s: %d lines written, %d dropped (over max_lines_per_second, queue full or "
                     "unwritable)", self.target, self.written, self.dropped)

    def _run(self) -> None:
        """Sleep until a line arrives (an idle proxy's writer never wakes), gather lines for
        `interval` (less when the queue is half full or at close), write them all."""
        writer = _Writer(self.target, self.rotate_bytes)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if len(self._queue) < self._wake_at:
                    self._closing.wait(self._interval)
                stopping = self._stopping
                self._drain(writer)
                if stopping:
                    self._drain(writer)
                    return
        finally:
            writer.close()

    def _drain(self, writer: _Writer) -> None:
        queue = self._queue
        lines: list[bytes] = []
        while queue:
            lines.append(render(queue.popleft()))
            if len(lines) >= 1000:
                self._write(writer, lines)
                lines = []
        if lines:
            self._write(writer, lines)

    def _write(self, writer: _Writer, lines: list[bytes]) -> None:
        try:
            writer.write(b"".join(lines))
        except (OSError, ValueError) as exc:
            self._lost += len(lines)
            writer.failed(exc)
        else:
            self.written += len(lines)


class _Writer:
    """The writer thread's output: a file rotated by size, or standard output."""

    def __init__(self, target: Path | str, rotate_bytes: int) -> None:
        self.path = None if target == "-" else Path(target)
        self.rotate_bytes = rotate_bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self._complained_at = 0.0

    def _open(self) -> BinaryIO:
        if self._file is None:
            if self.path is None:
                self._file = sys.stdout.buffer
            else:
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open by the writer
                self._size = self._file.tell()
        return self._file

    def write(self, data: bytes) -> None:
        file = self._open()
        file.write(data)
        file.flush()
        if self.path is not None:
            self._size += len(data)
            if self._size >= self.rotate_bytes:
                self._rotate()

    def _rotate(self) -> None:
        assert self.path is not None
        self.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._open()  # a new, empty file at once (for `tail -F` and people looking)

    def failed(self, exc: Exception) -> None:
        """A write failed: drop the file (reopened on the next write), say so at most once a minute."""
        self.close()
        now = time.monotonic()
        if now - self._complained_at >= 60.0 or not self._complained_at:
            self._complained_at = now
            log.error("access log %s: cannot write (lines dropped): %s", self.path or "-", exc)

    def close(self) -> None:
        if self._file is not None and self.path is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None


def open_access_log(setting: str | None, state_dir: Path) -> AccessLog | None:
    """The proxy's access log for `--access-log` (None: STATE_DIR/access.log; "off": none;
    "-": standard output; else a path), its writer started."""
    if setting == "off":
        return None
    access = AccessLog(state_dir / "access.log" if setting is None else setting)
    access.start()
    return access
