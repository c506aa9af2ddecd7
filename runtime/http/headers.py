"""Header fields a proxy must not forward, and the ones it adds.

RFC 9110 §7.6.1: Connection, every field it names, and the hop-by-hop fields
(Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) apply to one
connection only; Proxy-Authenticate/Proxy-Authorization are for this proxy, never the
next hop. The listener and the upstream client drop them while parsing (one set lookup
per field); `strip_hop_by_hop` is the same rule for headers built elsewhere.

Framing is never forwarded: the proxy re-frames every body itself (Content-Length when
the length is known, chunked otherwise), so the two sides cannot disagree on where a
message ends (no request smuggling).
"""

from __future__ import annotations

from starmesh.runtime.message import Headers

__all__ = [
    "HOP_BY_HOP",
    "NOT_FORWARDED",
    "append_forwarded_for",
    "connection_options",
    "remove_named",
    "strip_hop_by_hop",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
"""Hop-by-hop fields (RFC 9110 §7.6.1), lower-case."""

NOT_FORWARDED = HOP_BY_HOP | {"content-length", "host", "expect"}
"""Fields a writer never copies from a header list: hop-by-hop ones plus those it writes
itself (framing, Host) or handles at its own hop (Expect: 100-continue)."""

_CONNECTION_KEYWORDS = frozenset({"close", "keep-alive", "upgrade"})


def connection_options(value: str) -> frozenset[str]:
    """The lower-cased tokens of a Connection field value ("keep-alive, Upgrade")."""
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def remove_named(headers: Headers, connection: str) -> Headers:
    """`headers` without the fields that a Connection value names (other than its keywords).

    Returns `headers` itself when Connection names only close/keep-alive/upgrade (the
    common case: no copy).
    """
    named = connection_options(connection) - _CONNECTION_KEYWORDS
    if not named:
        return headers
    return [(name, value) for name, value in headers if name not in named]


def strip_hop_by_hop(headers: Headers, *, keep_upgrade: bool = False) -> Headers:
    """A copy of `headers` without hop-by-hop fields and the fields Connection names.

    `keep_upgrade` keeps Upgrade (a request or 101 answer that is being tunnelled).
    """
    named: frozenset[str] = frozenset()
    for name, value in headers:
        if name == "connection":
            named |= connection_options(value) - _CONNECTION_KEYWORDS
    return [
        (name, value)
        for name, value in headers
        if (name not in HOP_BY_HOP or (keep_upgrade and name == "upgrade")) and name not in named
    ]


def append_forwarded_for(headers: Headers, client: str) -> None:
    """Append the client's address to `x-forwarded-for` (in place; adds the field if absent)."""
    for index, (name, value) in enumerate(headers):
        if name == "x-forwarded-for":
            headers[index] = (name, f"{value}, {client}")
            return
    headers.append(("x-forwarded-for", client))
