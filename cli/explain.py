"""`starmesh explain`: where one request goes and whether it is allowed, step by step.

The answer comes from the decision engine the proxy runs (`DecisionTable.explain`,
bundle/explain.py), on the bundle compiled from the policy tree, so what explain says
is what a proxy with that bundle does. `--format json` prints `Decision.to_json()`
exactly as the proxy's admin `/explain` does (same dict, same `json.dumps` settings);
`--format text` is the same answer as a trace for people, rendered from that JSON so
the two cannot disagree.

Exit codes: 0 the request was explained (whatever the answer: a 404 or a denial is an
answer); 1 the policy has errors (the findings go to stderr, as `compile` prints them);
2 bad input: an unreadable tree, an unknown `--service`, a malformed `-H`, `--method`
or `--path`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from starmesh.bundle.decide import DecisionTable, RequestInfo, UnknownService
from starmesh.cli.compile import ENTRY_HELP, load_policy, policy_files
from starmesh.cli.console import Consoles
from starmesh.cli.errors import InputError
from starmesh.cli.options import format_option
from starmesh.cli.render import PolicyFiles, render_full, render_summary

__all__ = ["explain_command", "parse_header", "render_explain_json", "render_explain_text"]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP token (RFC 9110 `tchar`s): what a method or a header name is made of."""

_MATCHED, _MISSED = "bold green", "yellow"


def parse_header(item: str) -> tuple[str, str]:
    """`-H 'name: value'` -> (name, value), both stripped (as curl reads it); InputError otherwise."""
    name, sep, value = item.partition(":")
    name = name.strip()
    if not sep or not _TOKEN.fullmatch(name):
        raise InputError(f"-H {item!r} is not 'name: value' (for example -H 'end-user: jason')")
    if any(c in value for c in "\r\n\0"):
        raise InputError(f"-H {item!r}: a header value cannot hold CR, LF or NUL")
    return name, value.strip()


def _request(service: str, method: str, path: str, headers: Sequence[str], source: str | None) -> RequestInfo:
    if not _TOKEN.fullmatch(method):
        raise InputError(f"--method {method!r} is not an HTTP method (for example GET, POST)")
    if not path.startswith("/") or any(c.isspace() or c == "\0" for c in path):
        raise InputError(f"--path {path!r} must start with / and hold no spaces (for example /reviews/1?page=2)")
    return RequestInfo(
        service=service,
        method=method,
        path=path,
        headers=tuple(parse_header(item) for item in headers),
        source=source or None,
    )


def render_explain_json(explained: Mapping[str, Any]) -> str:
    """The JSON document, byte for byte what the admin `/explain` answers (without its final newline)."""
    return json.dumps(explained, indent=2, sort_keys=False)


# -- text --------------------------------------------------------------------------------------


def _place(ref: Mapping[str, Any] | None) -> str:
    """`lib/routing.star:15`, relative to the policy root as in the JSON (and in the
    authorization's `why`), or "" when the location is unknown."""
    if ref is None or ref.get("file") is None:
        return ""
    return f"{ref['file']}:{ref['line']}"


def _shares(backends: Mapping[str, int]) -> str:
    return ", ".join(f"{version} {share}%" for version, share in backends.items())


def _retries(r: Mapping[str, Any] | None) -> str:
    if r is None or r["attempts"] == 0:
        return "none"
    per_try = f", {r['per_try_timeout']} per try" if r["per_try_timeout"] else ""
    return f"up to {r['attempts']} retries{per_try}, on {', '.join(r['on'])}, budget {r['budget_percent']}%"


def _fault(f: Mapping[str, Any] | None) -> str:
    if f is None:
        return "none"
    parts = []
    if f["delay"] and f["delay_percent"]:
        parts.append(f"delay {f['delay']} on {f['delay_percent']}% of requests")
    if f["abort_status"] is not None and f["abort_percent"]:
        parts.append(f"abort with {f['abort_status']} on {f['abort_percent']}% of requests")
    return ", then ".join(parts) if parts else "none (nothing is delayed or aborted)"


def _mirror(m: Mapping[str, Any] | None) -> str:
    return "none" if m is None else f"{m['percent']}% of requests copied to {m['version']}"


def _rate_limit(r: Mapping[str, Any] | None) -> str:
    return "none" if r is None else f"{r['requests_per_second']} requests/s, burst {r['burst']}"


def _breaker(b: Mapping[str, Any]) -> str:
    return (
        f"at most {b['max_requests']} requests in flight, {b['max_pending_requests']} pending, "
        f"{b['max_connections']} connections"
    )


def _outliers(o: Mapping[str, Any] | None) -> str:
    if o is None:
        return "none"
    return (
        f"eject after {o['consecutive_5xx']} consecutive 5xx, for {o['base_ejection_time']} "
        f"(at most {o['max_ejection_percent']}% of endpoints)"
    )


def _settings(explained: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The label/value lines for what the proxies apply to the request."""
    lines: list[tuple[str, str]] = []
    if explained["backends"] is not None:  # a rule decided (none did: the proxy answers 404)
        lines += [
            ("backends", _shares(explained["backends"])),
            ("timeout", explained["timeout"] or "none"),
            ("retries", _retries(explained["retries"])),
            ("fault", _fault(explained["fault"])),
            ("mirror", _mirror(explained["mirror"])),
        ]
    return lines + [
        ("rate limit", _rate_limit(explained["rate_limit"])),
        ("circuit breaker", _breaker(explained["circuit_breaker"])),
        ("outlier detection", _outliers(explained["outlier_detection"])),
        ("load balancer", str(explained["load_balancer"])),
        ("mtls", str(explained["mtls"])),
    ]


def _outcome(explained: Mapping[str, Any]) -> str:
    """The last line: where the request ends up, or what the proxy answers itself."""
    response = explained["response"]
    if response is not None:
        status, reason = response["status"], response["reason"]
        side = {
            "no-route": "the calling proxy answers",
            "fault": "the calling proxy answers",
            "denied": "the receiving proxy answers",
        }.get(reason, "the proxy answers")
        return f"→ {side} {status} {reason}"
    backends = explained["backends"] or {}
    reached = [(v, share) for v, share in backends.items() if share > 0]
    where = " or ".join(f"{v} ({share}%)" for v, share in reached)
    line = f"→ {explained['service']} {where}"
    if explained["authorization"]["would_deny"]:
        line += " (audit: logged as would_deny)"
    return line


def render_explain_text(console: Console, explained: Mapping[str, Any], files: PolicyFiles) -> None:
    """The decision as a trace: the request, each rule tried, the settings, authorization, the outcome."""
    req = explained["request"]
    head = Text(f"{req['method']} {req['path']}", style="bold")
    head.append(f" to {explained['service']}")
    head.append(f" from {req['source']}" if req["source"] else " from an unauthenticated caller")
    console.print(head)
    for name, value in req["headers"].items():
        console.print(Text(f"  {name}: {value}"))
    if files.shown_root != ".":
        console.print(Text(f"  (policy files relative to {files.shown_root}/)", style="dim"))
    console.print()

    console.print(Text("routing", style="bold"))
    steps = explained["steps"]
    if not steps:
        if explained["backends"] is not None:
            console.print(Text("  no http_route: every request goes to all of the service's versions"))
        else:
            console.print(Text("  the http_route has no rules: nothing matches", style=_MISSED))
    for step in steps:
        line = Text("  ")
        line.append("✓" if step["matched"] else "✗", style=_MATCHED if step["matched"] else _MISSED)
        line.append(f" rules[{step['rule']}]")
        where = _place(step)
        if where:
            line.append(f" {where}", style="dim")
        line.append(f": {step['why']}")
        console.print(line)
    rule = explained["rule"]
    if rule is not None:
        where = _place(rule)
        console.print(Text(f"  matched rules[{rule['index']}]" + (f" ({where})" if where else ""), style=_MATCHED))
    elif steps:
        console.print(Text("  no rule matched", style=_MISSED))
    console.print()

    settings = _settings(explained)
    width = max(len(label) for label, _ in settings)
    for label, value in settings:
        console.print(Text(f"{label + ':':<{width + 2}}{value}"))
    console.print()

    authz = explained["authorization"]
    verdict = "allowed" if authz["allowed"] else "denied"
    if authz["would_deny"]:
        verdict = "allowed (audit mode: enforcement would deny it)"
    heading = Text("authorization", style="bold")
    heading.append(f" ({authz['mode']})" if authz["mode"] else "")
    heading.append(f": {verdict}", style=_MATCHED if authz["allowed"] and not authz["would_deny"] else _MISSED)
    console.print(heading)
    console.print(Text(f"  {authz['why']}"))
    if explained["mtls"] == "strict" and req["source"] is None:
        console.print(
            Text(
                f"  note: {explained['service']} takes strict mTLS: a caller without a mesh certificate is refused "
                "before authorization (--source names a proven caller)",
                style="dim",
            )
        )
    console.print()
    console.print(Text(_outcome(explained), style="bold"))


# -- the command ---------------------------------------------------------------------------------


@click.command("explain")
@click.argument("path", default=".", metavar="[PATH]", type=click.Path(path_type=Path))
@click.option("--service", required=True, metavar="S", help="The service the request is sent to (its Host).")
@click.option("--method", default="GET", show_default=True, metavar="M", help="The request's method.")
@click.option(
    "--path", "request_path", default="/", show_default=True, metavar="P", help="The request's path, query included."
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="A request header (repeat for more).",
)
@click.option("--source", metavar="SERVICE", help="The caller's proven identity (default: unauthenticated).")
@format_option("text: a step-by-step trace; json: what the proxy's admin /explain answers.")
@click.option("--entry", default="mesh.star", show_default=True, metavar="FILE", help=ENTRY_HELP)
@click.pass_context
def explain_command(
    ctx: click.Context,
    path: Path,
    service: str,
    method: str,
    request_path: str,
    headers: tuple[str, ...],
    source: str | None,
    output_format: str,
    entry: str,
) -> None:
    """Explain where a request goes and whether it is allowed.

    Compiles the policy tree at PATH (default: the current directory) and runs the
    request through the same decision code the proxy runs: each routing rule tried and
    why it matched or not (with file:line), the backends and their shares, timeout,
    retries, fault, mirror, rate limit, and the authorization decision with the allow
    rule that decided it. Exit status: 0 explained (a 404 or a denial is an answer),
    1 the policy has errors, 2 bad input (unreadable tree, unknown service, bad -H).

    \b
    Examples:
      starmesh explain --service reviews --path /reviews/1 -H 'end-user: jason'
      starmesh explain examples/bookinfo/policies --service ratings --source productpage
      starmesh explain . --service reviews --format json | jq .backends
    """
    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    request = _request(service, method, request_path, headers, source)
    result = load_policy(path, entry)
    files = policy_files(path, result)
    if result.bundle is None:
        render_full(consoles.err, result.findings, files)
        render_summary(consoles.err, result.errors, result.warnings)
        ctx.exit(1)
    table = DecisionTable.build(result.bundle.spec)
    try:
        decision = table.explain(request)
    except UnknownService:
        declared = ", ".join(sorted(table.services)) or "none"
        raise InputError(f"unknown service {service!r}: the policy declares {declared}") from None
    explained = decision.to_json()
    if output_format == "json":
        click.echo(render_explain_json(explained))
    else:
        render_explain_text(consoles.out, explained, files)
