"""Authorization on the receiving side, decided by the shared engine.

The decision comes from the service's `PreparedAuthorization.decide` (bundle/authz.py,
the same code `DecisionTable.authorize`, golden requests and explain use), with the
caller's identity proven by mTLS (`request.source`, never a header). `enforce`: a
denied request gets 403 `denied`. `audit`: the request goes on, and the recorder
counts it (`starmesh_authorization_audit_denials_total`; the access log hooks there to
write `"would_deny": true`).
"""

from __future__ import annotations

from collections.abc import Awaitable

from starmesh.bundle.authz import PreparedAuthorization
from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response
from starmesh.runtime.telemetry import Recorder

__all__ = ["authorization_filter"]


async def _answer(response: Response) -> Response:
    return response


def authorization_filter(service: str, authorization: PreparedAuthorization | None, recorder: Recorder) -> Filter | None:
    """Check each request against `authorization`; None for a service without one."""
    if authorization is None:
        return None
    decide = authorization.decide
    audit_denied = recorder.audit_denied

    def denied(request: Request) -> Response:
        who = request.source if request.source is not None else "an unauthenticated caller"
        return proxy_response(403, "denied", f"{service}'s authorization admits no rule for {who}: {request.method} {request.path}")

    def wrap(inner: Handler) -> Handler:
        def authorize(request: Request) -> Awaitable[Response]:
            method = request.method.upper()
            decision = decide(request.source, method, request.path)
            if not decision.allowed:
                return _answer(denied(request))
            if decision.would_deny:
                audit_denied(service, request.source, method, request.path)
            return inner(request)

        return authorize

    return wrap
