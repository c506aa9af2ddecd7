"""`starmesh status`: what the control plane serves and what every proxy runs.

    starmesh status ──GET /v1/status──► control plane (the first --control-plane that answers)
                    ◄── {"release", "last_compile", "rollout", "proxies": [...],
                         "control_plane": {...} (replicas on etcd only)} ──┘
                    text: summary lines + replicas + a table of proxies;  json: the answer, pretty-printed
    --watch [S]     again every S seconds (2) until Ctrl-C: redrawn in place on a terminal
                    (rich Live), else a fresh table (or one JSON document per line) each time

The proxy table shows, for each proxy (sorted by service, then id), the release and
bundle it runs, its state, how many releases it is behind the one meant for it, its
request rate and its last NACK reason; rows that are behind, failed or stale stand
out in colour. Ages come from the control plane's own clock (`last_seen_seconds_ago`),
so a skewed local clock cannot make a proxy look fresh or stale.

With replicas (`control-plane --store`), `--control-plane` is given once per replica:
they are asked in order until one answers, and the answer's `control_plane` object adds
which replica answered, the leader (or the warning that there is none), the store's
state (or the warning that it is read-only) and a table of replicas above the proxies
(`starmesh.cli.control_planes` asks, `starmesh.cli.status_replicas` renders).

The command reports; it does not judge. It exits 0 whenever the control plane answered
a well-formed status, however unhealthy the mesh looks (failed proxies, a rejected
commit, a halted rollout): scripts read `--format json` and decide. Exit 2 when the
control plane cannot be reached, answers an HTTP error, or answers something that is
not a status document; the message names the URL and the reason (every URL's, when
none of several answered). While watching, only
the first answer decides that: a later failure is shown, and the next refresh tries
again. Ctrl-C ends a watch with exit 0.

The HTTP call is `starmesh.cli.control_client.call_control_plane` (urllib, bounded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from rich.console import Console, Group, RenderableType
from rich.text import Text

from starmesh.cli.console import Consoles
from starmesh.cli.control_client import Answer, call_control_plane, printable
from starmesh.cli.control_planes import Reached, ReplicaURLs, control_planes_option
from starmesh.cli.errors import InputError
from starmesh.cli.options import ca_cert_option, format_option
from starmesh.cli.status_replicas import ControlPlaneInfo, control_plane_lines, replica_table

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["DEFAULT_WATCH", "StatusDocument", "parse_status", "render_status", "short", "status_command", "status_view"]

DEFAULT_WATCH = 2.0
"""Seconds between refreshes of `--watch` given without a value."""

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
    last_seen_seconds_ago: float | None = None
    releases_behind: int | None = None
    request_rate: float | None = None


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
    control_plane: ControlPlaneInfo | None = None


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


def _age(proxy: _Proxy, now: datetime) -> str:
    """How long ago the proxy was last seen: by the control plane's clock when it says,
    else from the `last_seen` stamp and the local clock."""
    if proxy.last_seen_seconds_ago is not None:
        return _ago(int(proxy.last_seen_seconds_ago))
    stamp = proxy.last_seen
    if not stamp:
        return "-"
    try:
        seconds = int((now - datetime.fromisoformat(stamp)).total_seconds())
    except (ValueError, TypeError):
        return printable(stamp)
    return printable(stamp) if seconds < 0 else _ago(seconds)


def _ago(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(0, seconds)}s ago"


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


def render_status(console: Console, doc: StatusDocument, *, url: str, now: datetime, skipped: Sequence[str] = ()) -> None:
    """The summary lines and the proxy table (`now` makes "last seen" ages)."""
    console.print(status_view(doc, url=url, now=now, skipped=skipped))


def status_view(doc: StatusDocument, *, url: str, now: datetime, skipped: Sequence[str] = ()) -> Group:
    """The summary lines, the replicas and the proxy table, as one renderable (printed, or
    live-updated); `skipped`: why the URLs asked before `url` did not answer."""
    lines: list[RenderableType] = [Text(printable(f"control plane  {url}"))]
    lines.extend(Text(printable(f"  skipped: {why}"), style="yellow") for why in skipped)

    def say(line: str) -> None:
        lines.append(Text(printable(line)))

    if doc.control_plane is not None:
        lines.extend(control_plane_lines(doc.control_plane))

    release, loop = doc.release, doc.reconciler
    if loop is not None and loop.repo:
        say(f"following      {loop.repo} branch {loop.branch or '?'}  ({loop.phase or '?'})")
    if release is None:
        say("release        none yet (nothing compiled or loaded)")
    else:
        why = f"  ({release.reason})" if release.reason and release.reason != "commit" else ""
        say(f"release        {release.version}  bundle {short(release.bundle)}  commit {short(release.commit)}{why}")
    compiled = doc.last_compile
    if compiled is None:
        say("last compile   none yet")
    else:
        n = len(compiled.diagnostics)
        if compiled.ok:
            notes = f" ({n} warning{'' if n == 1 else 's'})" if n else ""
            say(f"last compile   {short(compiled.commit)}  ok{notes}")
        else:
            say(f"last compile   {short(compiled.commit)}  failed, not released ({n} diagnostic{'' if n == 1 else 's'})")
        lines.extend(Text("  " + _diagnostic(diagnostic)) for diagnostic in compiled.diagnostics)
    if doc.rollout is not None:
        first, *more = _rollout(doc.rollout)
        say("rollout        " + first)
        lines.extend(Text(line) for line in more)
    counts: dict[str, int] = {}
    for proxy in doc.proxies:
        counts[proxy.state] = counts.get(proxy.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    behind = sum(1 for proxy in doc.proxies if (proxy.releases_behind or 0) > 0)
    say(f"proxies        {len(doc.proxies)}" + (f": {summary}" if summary else "") + (f"; {behind} behind" if behind else ""))
    if doc.control_plane is not None and doc.control_plane.replicas:
        lines += [Text(""), replica_table(doc.control_plane, now, _ago)]
    if doc.proxies:
        lines += [Text(""), _proxy_table(doc.proxies, now)]
    return Group(*lines)


_COLUMNS = ("ID", "SERVICE", "VERSION", "RELEASE", "BUNDLE", "STATE", "BEHIND", "REQ/S", "ERROR", "LAST SEEN")
_RIGHT = {"RELEASE", "BEHIND", "REQ/S", "LAST SEEN"}  # numbers; LAST SEEN last, so no row ends in padding


def _proxy_table(proxies: list[_Proxy], now: datetime) -> Table:
    """One row per proxy, by service then id; behind or pending rows yellow, failed (or
    NACKing) red, stale dim."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in _COLUMNS:
        table.add_column(column, no_wrap=column != "ERROR", justify="right" if column in _RIGHT else "left")
    for proxy in sorted(proxies, key=lambda p: (p.service or "", p.id)):
        cells = [
            proxy.id,
            proxy.service or "-",
            proxy.version or "-",
            _number(proxy.release_version),
            short(proxy.bundle),
            proxy.state,
            _number(proxy.releases_behind),
            _rate(proxy.request_rate),
            proxy.error or "-",
            _age(proxy, now),
        ]
        table.add_row(*(Text(printable(cell)) for cell in cells), style=_row_style(proxy))
    return table


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(rate: float | None) -> str:
    """Requests per second: one decimal, two below 1/s (a quiet proxy is not 0.0)."""
    return "-" if rate is None else f"{rate:.1f}" if rate >= 1 or rate == 0 else f"{rate:.2f}"


def _row_style(proxy: _Proxy) -> str | None:
    if proxy.state == "stale":
        return "dim"
    if proxy.state == "failed" or proxy.error:
        return "red"
    if proxy.state == "pending" or (proxy.releases_behind or 0) > 0:
        return "yellow"
    return None


# -- the command ------------------------------------------------------------------------


Answered = Reached[tuple[StatusDocument, Any]]
"""A status document (typed and raw), the replica that answered, and the ones skipped."""


@click.command("status")
@control_planes_option
@format_option("text for people, json (the answer as received, pretty-printed) for tools.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1, max=3600),
    is_flag=False,
    flag_value=DEFAULT_WATCH,
    default=None,
    metavar="[SECONDS]",
    help=f"Ask again every SECONDS ({DEFAULT_WATCH:g} if not given) until Ctrl-C; json: one document per line.",
)
@ca_cert_option
@click.pass_context
def status_command(
    ctx: click.Context, urls: tuple[str, ...], output_format: str, watch: float | None, ca_cert: Path | None
) -> None:
    """Show the control plane's release, last compile, rollout and every proxy's state.

    Proxy states: synced (runs the release meant for it), pending (not yet), failed (it
    rejected that release; ERROR says why), stale (no heartbeat within the TTL). BEHIND
    counts the releases issued after the one a proxy runs, up to the one meant for it;
    REQ/S is its request rate over its last heartbeat interval. The command reports and
    does not judge: exit 0 whenever the control plane answered, 2 when it cannot be
    reached or its answer is not a status document.

    With replicas (control-plane --store), give --control-plane once per replica: they
    are asked in order until one answers (the one that answered is named, with why the
    others did not), and the status adds the leader, the replicas and the store's state.

    \b
    Examples:
      starmesh status --control-plane http://127.0.0.1:8080
      starmesh status --control-plane https://cp-0:8443 --control-plane https://cp-1:8443 --ca-cert ca.crt
      starmesh status --control-plane http://127.0.0.1:8080 --watch
      starmesh status --control-plane http://127.0.0.1:8080 --format json | jq '.proxies[] | select(.state != "synced")'
    """
    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    replicas = ReplicaURLs(urls)

    def fetch() -> Answered:
        return replicas.ask(lambda url: parse_status(call_control_plane(url, "/v1/status", ca_cert=ca_cert)))

    first = fetch()  # exit 2 here when there is nothing to watch
    try:
        if watch is None:
            _show(consoles, first, output_format=output_format, compact=False)
        elif output_format == "text" and _is_terminal(consoles.out):
            _watch_live(consoles.out, fetch, first, interval=watch)
        else:
            _watch_lines(consoles, fetch, first, output_format=output_format, interval=watch)
    except KeyboardInterrupt:  # Ctrl-C ends a watch: exit 0 (click would say "Aborted!", exit 1)
        return


def _show(consoles: Consoles, answer: Answered, *, output_format: str, compact: bool) -> None:
    """Text: the view (skipped replicas in it); json: the document, skipped replicas on stderr."""
    doc, raw = answer.value
    console = consoles.out
    if output_format == "json":
        for why in answer.skipped:
            consoles.err.print(Text(printable(f"starmesh: warning: skipped: {why}")))
        text = json.dumps(raw, ensure_ascii=False, separators=(",", ":")) if compact else json.dumps(raw, indent=2, ensure_ascii=False)
        console.file.write(text + "\n")
    else:
        render_status(console, doc, url=answer.url, now=datetime.now(UTC), skipped=answer.skipped)
    console.file.flush()


def _watch_lines(
    consoles: Consoles, fetch: Callable[[], Answered], first: Answered, *, output_format: str, interval: float,
) -> None:  # fmt: skip
    """Not a terminal (or JSON): a fresh table, or one compact JSON document per line, each interval."""
    answer: Answered | None = first
    while True:
        if answer is not None:
            _show(consoles, answer, output_format=output_format, compact=True)
            if output_format == "text":
                consoles.out.file.write("\n")
                consoles.out.file.flush()
        time.sleep(interval)
        try:
            answer = fetch()
        except InputError as exc:  # shown, and tried again at the next refresh
            consoles.err.print(Text(printable(f"starmesh: error: {exc.format_message()}")))
            answer = None


def _watch_live(console: Console, fetch: Callable[[], Answered], first: Answered, *, interval: float) -> None:
    """A terminal: the status redrawn in place every interval (rich Live), the last one left on screen."""
    from rich.live import Live

    if not console.is_terminal:  # NO_COLOR on a terminal: still redraw in place, without colour
        console = Console(file=console.file, force_terminal=True, no_color=True, highlight=False, markup=False, emoji=False)

    def view(answer: Answered, problem: str | None) -> Group:
        now = datetime.now(UTC)
        when = f"{now:%H:%M:%S} UTC"
        footer = (Text(f"{when}, every {interval:g}s; Ctrl-C to stop", style="dim") if problem is None
                  else Text(f"{when}: {problem}; trying again in {interval:g}s", style="red"))  # fmt: skip
        return Group(status_view(answer.value[0], url=answer.url, now=now, skipped=answer.skipped), Text(""), footer)

    answer, problem = first, None
    with Live(view(first, None), console=console, auto_refresh=False, vertical_overflow="visible") as live:
        while True:
            time.sleep(interval)
            try:
                answer, problem = fetch(), None
            except InputError as exc:  # the last answer stays on screen, with why it is not newer
                problem = printable(exc.format_message())
            live.update(view(answer, problem), refresh=True)


def _is_terminal(console: Console) -> bool:
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:
        return False
