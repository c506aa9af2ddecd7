"""Serializing HTTP/1.1 message heads: one string built, one encode, one write.

Shared by the listener (response heads) and the upstream client (request heads). Header
lists come from the chain (runtime/message.py `Headers`); a writer skips the fields it
owns (framing, Host, hop-by-hop: runtime/http/headers.py) and appends its own.
"""

from __future__ import annotations

from http import HTTPStatus

from starmesh.runtime.message import Headers

__all__ = ["CONTINUE", "LAST_CHUNK", "chunk_prefix", "encode_head", "status_line"]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

_STATUS_LINES: dict[int, str] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus
}


_SHORT_HEAD = 16
"""Up to this many fields, encode_head appends to one string instead of joining a list."""


def status_line(status: int) -> str:
    """`HTTP/1.1 <status> <reason>\\r\\n` (cached for the registered codes)."""
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n"


def chunk_prefix(size: int) -> bytes:
    """The chunk-size line that precedes `size` bytes in chunked transfer-coding."""
    return b"%x\r\n" % size


def encode_head(first: str, headers: Headers, skip: frozenset[str], tail: str) -> bytes:
    """`first` line, every header not in `skip`, then `tail` (own fields + the blank line).

    Values are latin-1 on the wire (as they were parsed); a value outside latin-1 (set by
    policy) is sent as UTF-8 rather than failing the request.
    """
    if len(headers) <= _SHORT_HEAD:
        # One f-string per field onto the text so far: fewer steps than a list and a
        # join for the usual few fields (copying is quadratic, hence only for short heads).
        text = first
        for name, value in headers:
            if name not in skip:
                text = f"{text}{name}: {value}\r\n"
        text += tail
    else:
        parts = [first]
        append = parts.append
        for name, value in headers:
            if name not in skip:
                append(f"{name}: {value}\r\n")
        append(tail)
        text = "".join(parts)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
