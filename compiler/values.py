"""The text formats policy values must have: names, paths, methods, headers, addresses.

Each check takes a string and returns it normalized, or raises `ValueProblem` with a
message and a hint. What they accept (and document in docs/policy-reference.md):

- names of services, versions and meshes: DNS labels, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`,
  at most 63 characters (they become hostnames and SPIFFE ids);
- trust domains: dot-separated DNS labels;
- paths: start with `/`, no spaces or control characters; route paths have no `?` or
  `#` (path matches ignore the query string), request_test paths may carry a query,
  authorization paths may end in `*` (a prefix) and have no other `*`;
- methods: GET HEAD POST PUT DELETE PATCH OPTIONS CONNECT TRACE in any case,
  normalized to upper case (starmesh answers only these, so a typo is a dead rule);
- header names: RFC 9110 tokens, normalized to lower case (header names are
  case-insensitive); header values have no CR, LF or NUL;
- endpoints: `host:port` or `[ipv6]:port`, port 1-65535;
- regexes: Python `re` syntax, matched against the whole value.
"""

from __future__ import annotations

import re

__all__ = [
    "METHODS",
    "ValueProblem",
    "check_domain",
    "check_endpoint",
    "check_field_value",
    "check_header_name",
    "check_method",
    "check_name",
    "check_path",
    "check_regex",
]

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_LABEL = 63
_MAX_DOMAIN = 253
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")
_BAD_PATH_CHARS = re.compile(r"[\x00-\x20\x7f]")


class ValueProblem(ValueError):
    """A value in the wrong format: `str(self)` says what, `hint` what to write instead."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def check_name(text: str) -> str:
    """A service, version or mesh name: a lower-case DNS label."""
    if len(text) > _MAX_LABEL or not _LABEL.fullmatch(text):
        raise ValueProblem(
            f"invalid name {_q(text)}",
            "names are lower-case letters, digits and '-', start and end with a letter or digit, "
            "at most 63 characters (e.g. \"reviews\", \"v2\")",
        )
    return text


def check_domain(text: str) -> str:
    """A trust domain: lower-case DNS labels separated by dots."""
    labels = text.split(".")
    if len(text) > _MAX_DOMAIN or not all(len(x) <= _MAX_LABEL and _LABEL.fullmatch(x) for x in labels):
        raise ValueProblem(
            f"invalid trust domain {_q(text)}",
            'a trust domain is a lower-case DNS name, e.g. "cluster.local"',
        )
    return text


def check_path(text: str, *, query: bool = False, wildcard: bool = False) -> str:
    """A request path: starts with "/"; see the module docs for `query` and `wildcard`."""
    if not text.startswith("/"):
        raise ValueProblem(f"path {_q(text)} does not start with \"/\"", 'write paths from the root, e.g. "/api/"')
    if _BAD_PATH_CHARS.search(text):
        raise ValueProblem(
            f"path {_q(text)} contains a space or control character",
            "percent-encode it, e.g. %20 for a space",
        )
    if not query and ("?" in text or "#" in text):
        raise ValueProblem(
            f"path {_q(text)} contains '?' or '#'",
            "path matches ignore the query string; use match(query = {...}) for query parameters",
        )
    if "*" in text[:-1] or (text.endswith("*") and not wildcard):
        hint = (
            'only a trailing "*" is allowed: "/reviews/*" admits every path under /reviews/'
            if wildcard
            else "use path_prefix for a prefix, or path_regex for a pattern"
        )
        raise ValueProblem(f"path {_q(text)} contains '*' where it is not allowed", hint)
    return text


def check_method(text: str) -> str:
    """An HTTP method, upper-cased; one of METHODS."""
    upper = text.upper()
    if upper not in METHODS:
        raise ValueProblem(f"unknown HTTP method {_q(text)}", "methods are " + ", ".join(METHODS))
    return upper


def check_header_name(text: str) -> str:
    """A header name (an RFC 9110 token), lower-cased."""
    if not _TOKEN.fullmatch(text):
        raise ValueProblem(
            f"invalid header name {_q(text)}",
            "header names are letters, digits and !#$%&'*+-.^_`|~ (no spaces or ':'), e.g. \"x-user\"",
        )
    return text.lower()


def check_field_value(text: str) -> str:
    """A header value: anything but CR, LF and NUL (they would split or end the header)."""
    if any(c in text for c in "\r\n\x00"):
        raise ValueProblem(f"header value {_q(text)} contains CR, LF or NUL", "header values are one line of text")
    return text


def check_endpoint(text: str) -> str:
    """A static endpoint address: host:port or [ipv6]:port."""
    host, sep, port = text.rpartition(":")
    good_host = bool(_HOST.fullmatch(host) or _IPV6.fullmatch(host))
    good_port = bool(_PORT.fullmatch(port)) and 1 <= int(port) <= 65535
    if not sep or not good_host or not good_port:
        raise ValueProblem(
            f"invalid endpoint address {_q(text)}",
            'endpoints are "host:port" with a port 1-65535, e.g. "127.0.0.1:9081" or "[::1]:9081"',
        )
    return text


def check_regex(text: str) -> str:
    """A regular expression Python's `re` compiles."""
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueProblem(
            f"invalid regex {_q(text)}: {exc}",
            "regexes use Python re syntax and must match the whole value",
        ) from exc
    except (OverflowError, RecursionError) as exc:
        raise ValueProblem(f"regex {_q(text)} is too complex to compile", "simplify the pattern") from exc
    return text


def _q(text: str) -> str:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return '"' + shown.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
