"""Request header mutation: `remove_request_headers`, then `set_request_headers`.

Names arrive lower-cased from the prepared rule (header names are case-insensitive);
setting a header replaces every field of that name.
"""

from __future__ import annotations

from collections.abc import Awaitable

from starmesh.bundle.routes import PreparedRule
from starmesh.runtime.message import Filter, Handler, Request, Response

__all__ = ["headers_filter"]


def headers_filter(rule: PreparedRule) -> Filter | None:
    """Set/remove request headers per `rule`; None when the rule changes none."""
    if not rule.set_request_headers and not rule.remove_request_headers:
        return None
    additions = list(rule.set_request_headers)
    drop = frozenset(rule.remove_request_headers) | frozenset(name for name, _ in additions)

    def wrap(inner: Handler) -> Handler:
        def mutate_headers(request: Request) -> Awaitable[Response]:
            headers = [field for field in request.headers if field[0] not in drop]
            headers.extend(additions)
            request.headers = headers
            return inner(request)

        return mutate_headers

    return wrap
