"""Authorization that does not protect what it seems to.

SM403: `allow(sources = [...])` admits callers by their mTLS identity, never by a header.
With the service's effective mTLS (its own `mtls`, else the mesh's) `disable`, no caller
has an identity, so such a rule admits nobody: a warning that says so. Under
`permissive`, plaintext callers carry no identity, so the rule admits only the callers
that do use mTLS and plaintext calls from the named services are denied: also a warning
(a softer one), because permissive is a migration state and this is exactly the
surprise it causes. Rules without `sources` are not affected and not reported.

SM407: an authorization in `audit` mode logs what it would deny but denies nothing.

SM412: an `allow` with an empty `sources`, `methods` or `paths` list admits no request,
and an enforcing authorization with no `allow` at all denies every request.
"""

from __future__ import annotations

from collections.abc import Iterator

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.rules.context import LintContext, authorization_key, quoted

__all__ = ["admits_nothing", "audit_mode", "sources_without_mtls"]


def sources_without_mtls(ctx: LintContext) -> Iterator[Finding]:
    """SM403: source-based allows on a service whose mTLS is disable or permissive."""
    for name in sorted(ctx.spec.authorization):
        service = ctx.spec.services.get(name)
        if service is None:
            continue  # SM303
        mode = ctx.mtls_of(service)
        origin = "its own mtls" if service.mtls is not None else "the mesh's mtls"
        for index, allow in enumerate(ctx.spec.authorization[name].rules):
            if not allow.sources:
                continue
            sources = ", ".join(quoted(s) for s in allow.sources)
            if mode == "disable":
                yield ctx.finding(
                    "SM403",
                    authorization_key(name, index),
                    f"allow on {quoted(name)} admits only sources {sources}, but mTLS is disabled for {quoted(name)} "
                    f"({origin}): no caller carries an identity, so this rule admits nobody",
                    f'turn mTLS on for {quoted(name)} (mtls = "strict"), or drop sources from this allow',
                )
            elif mode == "permissive":
                yield ctx.finding(
                    "SM403",
                    authorization_key(name, index),
                    f"allow on {quoted(name)} admits only sources {sources}, but mTLS is permissive for {quoted(name)} "
                    f"({origin}): plaintext calls carry no identity, so this rule admits only callers using mTLS",
                    f'move {quoted(name)} to mtls = "strict" once every caller uses mTLS',
                )


def audit_mode(ctx: LintContext) -> Iterator[Finding]:
    """SM407: authorization in audit mode."""
    for name in sorted(ctx.spec.authorization):
        if ctx.spec.authorization[name].mode == "audit":
            yield ctx.finding(
                "SM407",
                authorization_key(name),
                f"authorization on {quoted(name)} is in audit mode: it logs what it would deny but denies nothing",
                'watch starmesh_authorization_audit_denials_total on the receiving proxy\'s /metrics, then set mode = "enforce"',
            )


def admits_nothing(ctx: LintContext) -> Iterator[Finding]:
    """SM412: allows with an empty list, and enforcing authorizations with no allow."""
    for name in sorted(ctx.spec.authorization):
        authorization = ctx.spec.authorization[name]
        if not authorization.rules and authorization.mode == "enforce":
            yield ctx.finding(
                "SM412",
                authorization_key(name),
                f"authorization on {quoted(name)} has no allow rules: every request to {quoted(name)} is denied",
                "add allow(...) rules for the callers that need access",
            )
        for index, allow in enumerate(authorization.rules):
            empty = [
                field
                for field, value in (("sources", allow.sources), ("methods", allow.methods), ("paths", allow.paths))
                if value is not None and len(value) == 0
            ]
            if empty:
                yield ctx.finding(
                    "SM412",
                    authorization_key(name, index),
                    f"allow on {quoted(name)} has an empty {' and '.join(empty)} list, so it admits no request",
                    "list what to admit, or leave the argument out to admit any",
                )
