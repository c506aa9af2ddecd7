"""The command line's HTTP client for the control plane (`starmesh status`, `rollback`).

Which control plane, when there are several replicas, is control_planes.py's part.

The command line talks to the control plane with `urllib.request`: one synchronous
request per command needs no event loop, and urllib honours the usual `HTTP(S)_PROXY` /
`NO_PROXY` variables as curl does. Every call is bounded: a 10 s timeout per socket
operation, an overall deadline while reading, and a byte cap on the answer (8 MiB), so
a wedged or hostile server cannot hang the command or fill its memory.
"""

from __future__ import annotations

import json
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from starmesh.cli.errors import InputError

__all__ = ["MAX_ANSWER_BYTES", "TIMEOUT_SECONDS", "Answer", "base_url", "call_control_plane", "printable"]

TIMEOUT_SECONDS = 10.0
MAX_ANSWER_BYTES = 8 << 20
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """The control plane's HTTP answer: status code and body (at most MAX_ANSWER_BYTES)."""

    url: str
    status: int
    body: bytes

    def error_text(self) -> str:
        """The `{"error": "..."}` message of a 4xx/5xx answer, or a printable excerpt of the body."""
        try:
            message = json.loads(self.body).get("error")
        except (ValueError, AttributeError):
            message = None
        text = message if isinstance(message, str) else self.body[:300].decode("utf-8", "replace").strip()
        return printable(text) or "(empty body)"


def base_url(url: str) -> str:
    """`url` without a trailing slash; InputError (exit 2) unless it is http(s):// with a host and no query."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--control-plane {url!r} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8080)")
    if parts.query or parts.fragment:
        raise InputError(f"--control-plane {url!r}: give the base URL, without a query or fragment")
    return url.rstrip("/")


def call_control_plane(
    url: str,
    path: str,
    *,
    body: dict[str, object] | None = None,
    ca_cert: Path | None = None,
    timeout: float = TIMEOUT_SECONDS,
    limit: int = MAX_ANSWER_BYTES,
) -> Answer:
    """GET (or, with `body`, POST as JSON) `url` + `path`; the answer whatever its status code.

    Raises InputError (exit 2) naming the URL when the control plane cannot be reached,
    the call times out, or the answer is larger than `limit` bytes."""
    import ssl
    import urllib.error
    import urllib.request

    target = base_url(url) + path
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(target, data=data, method="GET" if body is None else "POST")
    request.add_header("accept", "application/json")
    if data is not None:
        request.add_header("content-type", "application/json")
    handlers: list[urllib.request.BaseHandler] = []
    if ca_cert is not None:
        try:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_cert))))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"--ca-cert {ca_cert}: cannot load the certificate: {exc}") from exc
    opener = urllib.request.build_opener(*handlers)
    deadline = time.monotonic() + 2 * timeout
    try:
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:  # 4xx/5xx: still an answer
            response = exc
        with response:
            status = int(response.status or 0)
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read1(_CHUNK):  # what has arrived: a slow drip meets the deadline
                size += len(chunk)
                if size > limit:
                    raise InputError(f"control plane at {target} answered more than {limit} bytes; is that a starmesh control plane?")
                if time.monotonic() > deadline:
                    raise InputError(f"control plane at {target} did not finish answering within {2 * timeout:g} s")
                chunks.append(chunk)
    except InputError:
        raise
    except urllib.error.URLError as exc:
        raise InputError(f"cannot reach the control plane at {target}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed HTTP
        raise InputError(f"cannot reach the control plane at {target}: {exc or type(exc).__name__}") from exc
    return Answer(url=target, status=status, body=b"".join(chunks))


def printable(text: str) -> str:
    """`text` with control characters (a hostile or garbled answer's) replaced."""
    return "".join("\N{REPLACEMENT CHARACTER}" if unicodedata.category(c) == "Cc" else c for c in text)
