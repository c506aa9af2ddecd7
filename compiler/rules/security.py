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

SM414: mTLS relaxed below strict. The modes are ordered by what a receiving proxy
proves about its callers:

    strict       TLS with a client SVID only: every caller is identified, traffic encrypted
    permissive   TLS or plaintext on one port: plaintext callers carry no identity
    disable      plaintext only: nobody is identified, nothing is encrypted

A service whose own `mtls` is weaker than the mesh's is reported at the service; a
mesh-wide mode other than strict is reported once, at `mesh(...)`, naming the services
it leaves relaxed: every service whose effective mode is not strict and that was not
already reported at its own declaration (the list is cut after a few names). So each
relaxed service is reported exactly once, and a relaxed mesh whose services all set
mtls = "strict" is not reported at all.

SM415: an enforcing authorization whose `allow` names no sources, no methods and no
paths, or only a catch-all path ("/*") with no sources and no methods, admits every
caller, identified or not, for every request: the authorization protects nothing.
Audit mode is SM407's business and not reported again.
"""

from __future__ import annotations

from collections.abc import Iterator

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.rules.context import LintContext, authorization_key, quoted, service_key

__all__ = ["admits_nothing", "audit_mode", "relaxed_mtls", "sources_without_mtls", "wide_open_access"]

_STRENGTH = {"disable": 0, "permissive": 1, "strict": 2}
"""mTLS modes from weakest to strongest."""

_CONSEQUENCE = {
    "permissive": "plaintext calls are accepted too, unencrypted and without proven caller identity",
    "disable": "only plaintext is accepted: traffic is unencrypted and no caller proves its identity",
}
"""What a relaxed mode means for the receiving proxy."""

_MAX_NAMED = 5
"""How many services a mesh-wide SM414 names before it says "and N more"."""

_CATCH_ALL_PATHS = frozenset({"/*", "*"})
"""Authorization path patterns that match every request path."""


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


def relaxed_mtls(ctx: LintContext) -> Iterator[Finding]:
    """SM414: services whose own mtls is weaker than the mesh's, and a relaxed mesh-wide mtls."""
    mesh_mode = ctx.spec.mesh.mtls
    left_relaxed: dict[str, list[str]] = {"disable": [], "permissive": []}
    for name in sorted(ctx.spec.services):
        own = ctx.spec.services[name].mtls
        if own is not None and _STRENGTH[own] < _STRENGTH[mesh_mode]:
            yield ctx.finding(
                "SM414",
                service_key(name),
                f"{quoted(name)} relaxes mTLS to {quoted(own)} (the mesh's is {quoted(mesh_mode)}): {_CONSEQUENCE[own]}",
                f"set mtls = \"strict\" on {quoted(name)} (or drop its mtls to inherit the mesh's) once every caller "
                "reaches it through a mesh proxy; an edge service that outside clients call directly may stay "
                "relaxed, but then no allow on it can rely on sources",
            )
            continue
        effective = ctx.mtls_of(ctx.spec.services[name])
        if effective != "strict":
            left_relaxed[effective].append(name)
    if mesh_mode == "strict" or not any(left_relaxed.values()):
        return
    count = sum(len(names) for names in left_relaxed.values())
    clauses = [f"{_named(names)}: {_CONSEQUENCE[mode]}" for mode, names in left_relaxed.items() if names]
    yield ctx.finding(
        "SM414",
        "mesh",
        f"mesh mTLS is {quoted(mesh_mode)}, leaving {count} service{'s' if count != 1 else ''} without proven "
        f"caller identity; {'; '.join(clauses)}",
        'set mesh(mtls = "strict") once every proxy has a workload certificate (go through "permissive" and watch '
        'starmesh_inbound_connections_total{transport="plaintext"} drop to zero); a service that must stay relaxed '
        "can set its own mtls",
    )


def wide_open_access(ctx: LintContext) -> Iterator[Finding]:
    """SM415: enforcing allows with no sources and no methods, and no paths or a catch-all path."""
    for name in sorted(ctx.spec.authorization):
        authorization = ctx.spec.authorization[name]
        if authorization.mode != "enforce":
            continue  # SM407
        for index, allow in enumerate(authorization.rules):
            if allow.sources is not None or allow.methods is not None:
                continue
            if allow.paths is None:
                what = "names no sources, methods or paths"
            else:
                catch_all = sorted(_CATCH_ALL_PATHS.intersection(allow.paths))
                if not catch_all:
                    continue
                what = f"admits path {quoted(catch_all[0])} (every path) and names no sources or methods"
            yield ctx.finding(
                "SM415",
                authorization_key(name, index),
                f"allow on {quoted(name)} {what}: it admits every caller, identified or not, for every method and "
                f"path, so the authorization on {quoted(name)} denies nothing",
                "name the callers with sources = [...] (proven by mTLS), or narrow methods or paths to what must "
                "be open to everyone",
            )


def _named(names: list[str]) -> str:
    """Up to `_MAX_NAMED` quoted names, then how many more there are."""
    shown = ", ".join(quoted(n) for n in names[:_MAX_NAMED])
    return shown if len(names) <= _MAX_NAMED else f"{shown} and {len(names) - _MAX_NAMED} more"
