"""`starmesh status`: what the control plane serves and what every proxy runs.

    starmesh status ──GET /v1/status──► control plane
                    ◄── {"release", "last_compile", "rollout", "proxies": [...]} ──┘
                    text: summary lines + a table of proxies;  json: the answer, pretty-printed

The command reports; it does not judge. It exits 0 whenever the control plane answered
a well-formed status, however unhealthy the mesh looks (failed proxies, a rejected
commit, a halted rollout): scripts read `--format json` and decide. Exit 2 when the
control plane cannot be reached, answers an HTTP error, or answers something that is
not a status document; the message names the URL and the reason.

The HTTP call is `starmesh.cli.control_client.call_control_plane` (urllib, bounded).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.text import Text

from starmesh.cli.compile import InputError
from starmesh.cli.console import Consoles
from starmesh.cli.control_client import Answer, call_control_plane, printable
from starmesh.cli.options import ca_cert_option, control_plane_option, format_option

__all__ = ["StatusDocument", "parse_status", "render_status", "short", "status_command"]

# -- the status document (DESIGN.md: /v1/status); unknown fields are ignored ------------


class _Release(msgspec.Struct, frozen=True):
    version: int
    bundle: str
    commit: str | None = None
    reason: str | None = None
    expires_at: str | None = None


class _Diagnostic(msgspec.Struct, frozen=True):
    message: str
    file: str | None = None
    line: int | None = None
    col: int | None = None
    code: str | None = None
    severity: str | None = None


class _Compile(msgspec.Struct, frozen=True):
    ok: bool
    commit: str | None = None
    diagnostics: list[_Diagnostic] = []


class _Proxy(msgspec.Struct, frozen=True):
    id: str
    state: str
    service: str | None = None
    version: str | None = None
    release_version: int | None = None
    bundle: str | None = None
    error: str | None = None
    last_seen: str | None = None


class _Ref(msgspec.Struct, frozen=True):
    version: int
    bundle: str | None = None


class _Failure(msgspec.Struct, frozen=True):
    proxy: str
    reason: str = ""


class _Halted(msgspec.Struct, frozen=True):
    reason: str | None = None
    rolled_back_to: _Ref | None = None


class _Policy(msgspec.Struct, frozen=True):
    max_failures: int = 0


class _Rollout(msgspec.Struct, frozen=True):
    phase: str | None = None
    version: int | None = None
    stable: _Ref | None = None
    canary: list[str] = []
    acked: list[str] = []
    failures: list[_Failure] = []
    bake_until: str | None = None
    halted: _Halted | None = None
    policy: _Policy | None = None


class _Reconciler(msgspec.Struct, frozen=True):
    repo: str | None = None
    branch: str | None = None
    phase: str | None = None


class StatusDocument(msgspec.Struct, frozen=True):
    """`GET /v1/status` as the command line reads it."""

    release: _Release | None
    last_compile: _Compile | None
    proxies: list[_Proxy]
    rollout: _Rollout | None = None
    reconciler: _Reconciler | None = None


def parse_status(answer: Answer) -> tuple[StatusDocument, Any]:
    """The typed document and the raw JSON; InputError (exit 2) when it is not a status."""
    if answer.status != 200:
        raise InputError(f"control plane at {answer.url} answered HTTP {answer.status}: {answer.error_text()}")
    try:
        raw = json.loads(answer.body)
        return msgspec.convert(raw, StatusDocument), raw
    except (ValueError, msgspec.ValidationError) as exc:
        raise InputError(f"control plane at {answer.url} answered something that is not a status document: {exc}") from exc


# -- text ----------------------------------------------------------------------------


def short(value: str | None, keep: int = 12) -> str:
    """A digest or commit shortened for people: `sha256:4f0c1a2b3c4d`, `1a2b3c4d5e6f`; `-` for none."""
    if not value:
        return "-"
    prefix = "sha256:" if value.startswith("sha256:") else ""
    return printable(prefix + value[len(prefix) : len(prefix) + keep])


def _age(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return "-"
    try:
        seconds = int((now - datetime.fromisoformat(stamp)).total_seconds())
    except (ValueError, TypeError):
        return printable(stamp)
    if seconds < 0:
        return printable(stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _diagnostic(d: _Diagnostic) -> str:
    where = f"{d.file}:{d.line}:{d.col}: " if d.file and d.line is not None else f"{d.file}: " if d.file else ""
    code = f"{d.code} " if where and d.code else f"{d.code}: " if d.code else ""
    return printable(f"{where}{code}{d.message}")


def _rollout(rollout: _Rollout) -> list[str]:
    """The rollout line, then a line per failure (or the halt's reason)."""
    if rollout.phase is None:
        return ["none"]
    parts = [rollout.phase, f"release {rollout.version}"]
    if rollout.stable is not None and rollout.stable.version != rollout.version:
        parts.append(f"stable {rollout.stable.version}")
    if rollout.phase in ("canary", "baking") and rollout.canary:
        parts.append(f"canaries {', '.join(rollout.canary)}")
    if rollout.phase == "baking" and rollout.bake_until:
        parts.append(f"bake until {rollout.bake_until}")
    if rollout.phase != "complete":  # a complete rollout's counters say nothing more
        parts.append(f"acked {len(rollout.acked)}")
        tolerated = f" (tolerated {rollout.policy.max_failures})" if rollout.policy is not None else ""
        parts.append(f"failures {len(rollout.failures)}{tolerated}")
    lines = ["  ".join(parts)]
    halted = rollout.halted
    if halted is not None:
        back = halted.rolled_back_to
        to = f"; rolled back as release {back.version} ({short(back.bundle)})" if back is not None else ""
        lines.append(f"  halted: {halted.reason or 'failures'}{to}")
    else:
        lines.extend(f"  failure {f.proxy}: {f.reason}" for f in rollout.failures)
    return [printable(line) for line in lines]


def render_status(console: Console, doc: StatusDocument, *, url: str, now: datetime) -> None:
    """The summary lines and the proxy table (`now` makes "last seen" ages)."""
    from rich import box
    from rich.table import Table

    release = doc.release
    console.print(f"control plane  {printable(url)}")
    loop = doc.reconciler
    if loop is not None and loop.repo:
        console.print(Text(printable(f"following      {loop.repo} branch {loop.branch or '?'}  ({loop.phase or '?'})")))
    if release is None:
        console.print("release        none yet (nothing compiled or loaded)")
    else:
        why = f"  ({release.reason})" if release.reason and release.reason != "commit" else ""
        console.print(f"release        {release.version}  bundle {short(release.bundle)}  commit {short(release.commit)}{why}")
    compiled = doc.last_compile
    if compiled is None:
        console.print("last compile   none yet")
    else:
        n = len(compiled.diagnostics)
        if compiled.ok:
            notes = f" ({n} warning{'' if n == 1 else 's'})" if n else ""
            console.print(f"last compile   {short(compiled.commit)}  ok{notes}")
        else:
            console.print(f"last compile   {short(compiled.commit)}  failed, not released ({n} diagnostic{'' if n == 1 else 's'})")
        for diagnostic in compiled.diagnostics:
            console.print(Text("  " + _diagnostic(diagnostic)))
    if doc.rollout is not None:
        first, *more = _rollout(doc.rollout)
        console.print(Text("rollout        " + first))
        for line in more:
            console.print(Text(line))
    counts: dict[str, int] = {}
    for proxy in doc.proxies:
        counts[proxy.state] = counts.get(proxy.state, 0) + 1
    summary = ", ".join(f"{n} {printable(state)}" for state, n in sorted(counts.items()))
    console.print(f"proxies        {len(doc.proxies)}" + (f": {summary}" if summary else ""))
    if not doc.proxies:
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("ID", "SERVICE", "VERSION", "RELEASE", "STATE", "ERROR", "LAST SEEN"):
        # LAST SEEN is right-justified, so no row ends in padding.
        table.add_column(column, no_wrap=column != "ERROR", justify="right" if column == "LAST SEEN" else "left")
    for proxy in doc.proxies:
        cells = [
            proxy.id,
            proxy.service or "-",
            proxy.version or "-",
            "-" if proxy.release_version is None else str(proxy.release_version),
            proxy.state,
            proxy.error or "-",
            _age(proxy.last_seen, now),
        ]
        table.add_row(*(Text(printable(cell)) for cell in cells))
    console.print()
    console.print(table)


@click.command("status")
@control_plane_option
@format_option("text for people, json (the answer as received, pretty-printed) for tools.")
@ca_cert_option
@click.pass_context
def status_command(ctx: click.Context, url: str, output_format: str, ca_cert: Path | None) -> None:
    """Show the control plane's release, last compile, rollout and every proxy's state.

    Proxy states: synced (runs the release meant for it), pending (not yet), failed (it
    rejected that release; ERROR says why), stale (no heartbeat within the TTL). The
    command reports and does not judge: exit 0 whenever the control plane answered,
    2 when it cannot be reached or its answer is not a status document.

    \b
    Examples:
      starmesh status --control-plane http://127.0.0.1:8080
      starmesh status --control-plane http://127.0.0.1:8080 --format json | jq '.proxies[] | select(.state != "synced")'
    """
    from datetime import UTC

    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    doc, raw = parse_status(call_control_plane(url, "/v1/status", ca_cert=ca_cert))
    if output_format == "json":
        click.echo(json.dumps(raw, indent=2, ensure_ascii=False))
    else:
        render_status(consoles.out, doc, url=url, now=datetime.now(UTC))
