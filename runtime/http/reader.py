"""Reading requests off one client connection: httptools callbacks to `Request`, bounded.

    bytes ─► httptools ─► on_url / on_header ─► on_headers_complete ─► Request ─► owner.enqueue
                           (hop-by-hop dropped,     (framing checked,       body: FixedBody when it
                            size/count bounded)      target and Host read)  came with the head, else
                                                                            a StreamBody fed here

The reader checks everything that could make the two sides of the proxy disagree on
where a message ends, and rejects it before anything is dispatched: Content-Length with
Transfer-Encoding, duplicate Content-Length (httptools/llhttp), Transfer-Encoding other
than exactly `chunked`, chunked HTTP/1.0. Headers reach the chain clean: hop-by-hop
fields, Content-Length and Expect are dropped (bodies are re-framed by the upstream
client), `x-forwarded-for` gets the client address, Host is kept (and replaced by the
target's authority for absolute-form requests).

On the inbound side (`strip_identity`) identity headers from outside are dropped too,
in any case and however often repeated: `x-forwarded-client-cert` and every
`x-starmesh-*` field. The caller's identity is only what its connection proved
(`source`), never a header. The check costs nothing per field: identity names join the
set of inspected names when the name cache learns them (names past the cache's bound
are checked as they come).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import httptools

from starmesh.runtime.http.body import StreamBody
from starmesh.runtime.http.headers import HOP_BY_HOP, remove_named
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.message import EMPTY, FixedBody, Headers, Request

__all__ = ["FORWARDED_CLIENT_CERT", "IDENTITY_PREFIX", "ReaderOwner", "RequestReader", "is_identity_header", "service_of"]

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")}

_INSPECTED = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for"}
"""Request fields the reader looks at; of these only host and x-forwarded-for are kept."""

IDENTITY_PREFIX = "x-starmesh-"
FORWARDED_CLIENT_CERT = "x-forwarded-client-cert"

_INSPECTED_INBOUND: set[str] = set(_INSPECTED) | {FORWARDED_CLIENT_CERT}
"""The inbound reader's inspected names: _INSPECTED plus identity names (dropped). Grows
with the `x-starmesh-*` names the name cache learns, so it is bounded by the cache."""

_CONNECTION_KEYWORDS = frozenset({"close", "keep-alive", "upgrade"})

_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 2048


class ReaderOwner(Protocol):
    """The connection a RequestReader reads for (runtime/http/server.py)."""

    def enqueue(self, request: Request) -> None:
        """A request's head (and maybe its whole body) has arrived: dispatch it in turn."""

    def reject(self, status: int, message: str) -> None:
        """A protocol error: answer `status` with `message` after earlier answers, then close."""

    def head_started(self) -> None:
        """A request head began: the header timeout runs from `reader.head_begun`."""

    def upgraded(self, early: bytes) -> None:
        """An Upgrade request's head ended; `early` is what followed it in the same read."""

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def body_reading(self, body: StreamBody) -> None: ...

    def body_closed(self, body: StreamBody) -> None: ...


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing once the owner has the answer."""


class RequestReader:
    """Parses one connection's bytes into Requests with httptools, within `limits`."""

    def __init__(
        self,
        owner: ReaderOwner,
        limits: HttpLimits,
        loop_time: Callable[[], float],
        *,
        client: str,
        source: str | None,
        forwarded_for: bool,
        strip_identity: bool = False,
    ) -> None:
        self._owner = owner
        self._time = loop_time
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._max_body = limits.max_request_body
        self._client = client
        self._source = source
        self._forwarded_for = forwarded_for and bool(client)
        self._strip_identity = strip_identity
        self._inspected: set[str] | frozenset[str] = _INSPECTED_INBOUND if strip_identity else _INSPECTED
        self._parser = httptools.HttpRequestParser(self)
        self._last_host = ""
        self._last_service = ""
        self.stopped = False
        self.head_begun: float | None = None
        """Loop time the request head being read began at; None between heads."""
        self.parsing: Request | None = None
        """The request whose head is complete and whose body is still arriving."""
        self.stream: StreamBody | None = None
        self.continue_body: StreamBody | None = None
        """A streamed body whose client waits for `100 Continue` before sending it."""
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._xff_field = ("x-forwarded-for", client)
        self._head_partial = 0
        self._fed = 0
        """Bytes in the feed being parsed (with `_head_partial`: a bound on the head's size)."""
        self._length: int | None = 0
        self._body_size = 0
        self._parts: list[bytes] | None = None
        self._expect_continue = False

    def feed(self, data: bytes) -> None:
        """Parse `data`; complete heads go to `owner.enqueue`, errors to `owner.reject`."""
        self._fed = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.stopped = True
            self._owner.upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self.reject(400, f"malformed request: {str(exc).strip() or type(exc).__name__}")
            return
        if self.parsing is not None:
            if self.stream is None:
                self._start_stream()
        elif self.head_begun is not None:
            # A head in progress: count what the parser buffers for a field not yet ended.
            self._head_partial += len(data)
            if self._head_partial > self._max_header_bytes:
                self.reject(431, f"request head larger than {self._max_header_bytes} bytes")

    def fail_body(self, exc: BaseException) -> None:
        """The connection is gone: a body still arriving never completes."""
        if self.stream is not None:
            self.stream.fail(exc)
            self.stream = None

    def reject(self, status: int, message: str) -> None:
        """Stop reading: hand the owner the answer for a protocol error (once)."""
        if self.stopped:
            return
        self.stopped = True
        self.head_begun = None
        self.parsing = None
        self._owner.reject(status, message)

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head_begun = self._time()
        self._owner.head_started()
        self._url = b""
        self._raw = []
        self._head_partial = self._body_size = 0
        self._parts = None
        self._expect_continue = False

    def on_url(self, url: bytes) -> None:
        target = self._url = self._url + url
        if len(target) > self._max_header_bytes:
            self.reject(431, f"request line longer than {self._max_header_bytes} bytes")
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))  # checked and decoded at once in on_headers_complete

    def on_headers_complete(self) -> None:
        """Bound, decode and sort the head's fields in one pass, then build the Request."""
        raw = self._raw
        if len(raw) > self._max_headers:
            self.reject(431, f"more than {self._max_headers} request header fields")
            raise _Reject
        headers: Headers = []
        append = headers.append
        cache = _NAME_CACHE
        inspected = self._inspected
        content_length = transfer_encoding = connection = upgrade_value = expect = host = None
        hosts = 0
        xff = -1
        for name, value in raw:
            key = cache.get(name)
            if key is None:
                key = _header_name(name)
                if self._strip_identity and is_identity_header(key):
                    continue  # a name the cache did not take: dropped here
            text = value.decode("latin-1")
            if key not in inspected:
                append((key, text))
            elif key == "host":
                hosts += 1
                host = text
                append((key, text))
            elif key == "x-forwarded-for":
                if xff < 0:
                    xff = len(headers)
                append((key, text))
            elif key == "content-length":
                content_length = text
            elif key == "transfer-encoding":
                transfer_encoding = text
            elif key == "connection":
                connection = text if connection is None else f"{connection}, {text}"
            elif key == "upgrade":
                upgrade_value = text
            elif key == "expect":
                expect = text
            # keep-alive, proxy-connection, te, trailer, proxy-authenticate/-authorization,
            # and on the inbound side identity headers: dropped
        if self._head_partial + self._fed > self._max_header_bytes:
            # The bytes fed since the head began bound its size: count only when they could be over.
            size = len(self._url) + sum(len(name) + len(value) + 4 for name, value in raw)
            if size > self._max_header_bytes:
                self.reject(431, f"request head larger than {self._max_header_bytes} bytes")
                raise _Reject

        parser = self._parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self.reject(400, f"HTTP/{version} is not supported")
            raise _Reject
        length: int | None
        if transfer_encoding is None and content_length is None:
            length = self._length = 0  # no body: the common case
        else:
            length = self._framing(version, transfer_encoding, content_length)
        upgrade = parser.should_upgrade()
        if method == "CONNECT":
            self.reject(405, "CONNECT is not supported")
            raise _Reject
        if upgrade:
            if length != 0:
                self.reject(400, "an Upgrade request with a body is not supported")
                raise _Reject
            headers.append(("upgrade", upgrade_value or ""))

        url = self._url
        query: str | None = None
        if url[:1] == b"/":  # origin-form, the common case
            mark = url.find(b"?")
            if mark < 0:
                path = url.decode("latin-1")
            else:
                path = url[:mark].decode("latin-1")
                query = url[mark + 1 :].decode("latin-1")
            if hosts != 1 and (hosts > 1 or version != "1.0"):
                self.reject(400, "a request needs exactly one Host header")
                raise _Reject
            authority = host or ""
            if authority == self._last_host:
                service = self._last_service
            else:
                service = service_of(authority)
                self._last_host, self._last_service = authority, service
        elif url == b"*":
            path, authority = "*", host or ""
            service = service_of(authority)
        else:
            path, query, authority, service = self._absolute_form(url)
            headers = [(k, v) for k, v in headers if k != "host"]
            headers.append(("host", authority))
            xff = _index_of(headers, "x-forwarded-for")

        if connection is not None and connection.strip().lower() not in _CONNECTION_KEYWORDS:
            headers = remove_named(headers, connection)
            xff = _index_of(headers, "x-forwarded-for")
        if self._forwarded_for:
            if xff >= 0:
                field, prior = headers[xff]
                headers[xff] = (field, f"{prior}, {self._client}")
            else:
                append(self._xff_field)

        if expect is not None and length != 0 and version == "1.1" and expect.strip().lower() == "100-continue":
            self._expect_continue = True

        begun = self.head_begun or 0.0
        self.head_begun = None
        # Positional: keyword arguments would cost about 0.25 µs per request (message.py).
        self.parsing = Request(
            method,
            path,
            query,
            headers,
            EMPTY,
            service,
            authority,
            self._client,
            self._source,
            version,
            parser.should_keep_alive(),
            upgrade,
            begun,
        )

    def _framing(self, version: str, transfer_encoding: str | None, content_length: str | None) -> int | None:
        """The body's length (0: none), None for chunked; exactly one framing, or 400/413."""
        length: int | None
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                self.reject(400, "Transfer-Encoding other than 'chunked' is not supported")
                raise _Reject
            if version == "1.0":
                self.reject(400, "Transfer-Encoding in an HTTP/1.0 request")
                raise _Reject
            length = None
        elif content_length is not None:
            length = int(content_length)  # digits only: llhttp checked
        else:
            length = 0
        if self._max_body is not None and length is not None and length > self._max_body:
            self.reject(413, f"request body of {length} bytes is over the limit of {self._max_body}")
            raise _Reject
        self._length = length
        return length

    def _absolute_form(self, url: bytes) -> tuple[str, str | None, str, str]:
        """`http://host[:port]/path?query` (HTTP_PROXY use): path, query, authority, service."""
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            self.reject(400, "invalid request target")
            raise _Reject from None
        if parsed.schema.lower() != b"http" or not parsed.host:
            self.reject(400, "absolute-form targets must be http://host[:port]/path")
            raise _Reject
        host = parsed.host.decode("latin-1")
        service = host.lower()
        if ":" in host:
            host = f"[{host}]"
        authority = host if parsed.port is None else f"{host}:{parsed.port}"
        path = parsed.path.decode("latin-1") if parsed.path else "/"
        query = parsed.query.decode("latin-1") if parsed.query is not None else None
        return path, query, authority, service

    def on_body(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._max_body is not None and self._body_size > self._max_body:
            self.reject(413, f"request body over the limit of {self._max_body} bytes")
            raise _Reject
        stream = self.stream
        if stream is not None:
            stream.feed(data)
        elif self._parts is None:
            self._parts = [data]
        else:
            self._parts.append(data)

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is None:  # pragma: no cover - httptools calls this only after a head
            return
        self.parsing = None
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.finish()
            if self.continue_body is stream:
                self.continue_body = None
            return
        parts = self._parts
        if parts is not None:
            self._parts = None
            request.body = FixedBody(parts[0] if len(parts) == 1 else b"".join(parts))
        self._owner.enqueue(request)

    def _start_stream(self) -> None:
        """The head is complete and the body is still arriving: dispatch with a StreamBody."""
        request = self.parsing
        assert request is not None
        stream = StreamBody(self._length, self._owner, self._parts)
        self._parts = None
        self.stream = stream
        if self._expect_continue:
            self.continue_body = stream
        request.body = stream
        self._owner.enqueue(request)


def _header_name(name: bytes) -> str:
    key = name.decode("latin-1").lower()
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        if is_identity_header(key):
            _INSPECTED_INBOUND.add(key)  # before the cache has it: a cached name is always classified
        _NAME_CACHE[name] = key
    return key


def is_identity_header(name: str) -> bool:
    """Whether a request field (lower-case name) claims an identity: never taken from outside."""
    return name.startswith(IDENTITY_PREFIX) or name == FORWARDED_CLIENT_CERT


def service_of(authority: str) -> str:
    """The host part of a Host value, lower-cased, without the port ("[::1]:80" -> "::1")."""
    host = authority.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    mark = host.rfind(":")
    return host[:mark] if mark >= 0 else host


def _index_of(headers: Headers, name: str) -> int:
    for index, (key, _) in enumerate(headers):
        if key == name:
            return index
    return -1
