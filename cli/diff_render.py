"""`starmesh diff`'s three outputs of one `DiffReport`: rich text, Markdown, JSON.

    text      for a terminal: the sides, changes grouped by service (mesh first) with
              their risk and policy line, a one-line tally, golden-request changes, and
              the requests table (changed ones first). Styled only on a terminal; the
              risk labels are written out in brackets, so nothing depends on colour.
    markdown  for a pull-request comment: a heading, the tally, one table of changes
              (`| Service | Change | Risk | Policy |`), golden-request changes, and the
              requests in a collapsed `<details>` block.
    json      `DiffReport.to_json()` (DESIGN.md's "Diff JSON"), indented.

Text and Markdown show policy files the way lint's text does (`shown`: relative to the
current directory when the policy root is inside it); JSON keeps them relative to the
policy root. Everything that came from a policy or a user (summaries, names, labels) is
escaped for the format: control characters replaced, Markdown punctuation backslashed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from starmesh.cli.control_client import printable
from starmesh.cli.status import short
from starmesh.preview.model import (
    RELAXES_MTLS,
    REMOVES_PROTECTION,
    REMOVES_ROUTE,
    RISK_ORDER,
    WIDENS_ACCESS,
    Change,
    DiffReport,
    Outcome,
    RequestImpact,
    TestChanges,
)

__all__ = [
    "NO_CHANGE",
    "describe_outcome",
    "render_json",
    "render_markdown",
    "render_text",
    "sorted_risks",
    "tally",
]

NO_CHANGE = "no change in behaviour"
"""What every format says when the proxies would behave the same."""

ShowFile = Callable[[str], str]

_SERIOUS = frozenset({WIDENS_ACCESS, RELAXES_MTLS, REMOVES_PROTECTION})
_STYLE_SERIOUS, _STYLE_RISK, _STYLE_PLACE, _STYLE_CHANGED = "bold red", "bold yellow", "dim", "bold yellow"
_AT_DESTINATION = frozenset({"denied", "rate-limited"})
"""Answers the receiving proxy gives: the request was routed first, so where to matters."""
_DETAILS_FROM = 10
"""Markdown folds the requests table into `<details>` from this many rows (always when
nothing changed for any of them)."""


# -- shared ------------------------------------------------------------------------------------


def _risk_rank(label: str) -> float:
    if label in RISK_ORDER:
        return RISK_ORDER.index(label)
    if label.startswith("shifts "):  # shifts N% of traffic: after REMOVES_ROUTE (model.py)
        return RISK_ORDER.index(REMOVES_ROUTE) + 0.5
    return len(RISK_ORDER)


def sorted_risks(labels: Iterable[str]) -> list[str]:
    """`labels`, most serious first (RISK_ORDER), each once."""
    return sorted(dict.fromkeys(labels), key=_risk_rank)


def _plural(label: str) -> str:
    """`widens access` -> `widen access`: the label's verb for more than one change."""
    verb, _, rest = label.partition(" ")
    if verb.endswith(("xes", "shes", "ches", "sses")):
        verb = verb[:-2]
    elif verb.endswith("s"):
        verb = verb[:-1]
    return f"{verb} {rest}" if rest else verb


def tally(report: DiffReport) -> str:
    """One line: `3 changes in behaviour: 2 widen access, 1 shifts 40% of traffic`, or NO_CHANGE."""
    changes = report.changes
    if not changes:
        return NO_CHANGE
    counts: dict[str, int] = {}
    for change in changes:
        for label in dict.fromkeys(change.risk):
            counts[label] = counts.get(label, 0) + 1
    head = f"{len(changes)} change{'' if len(changes) == 1 else 's'} in behaviour"
    if not counts:
        return f"{head}, none with a risk label"
    parts = [f"{counts[label]} {label if counts[label] == 1 else _plural(label)}" for label in sorted_risks(counts)]
    return f"{head}: {', '.join(parts)}"


def _by_service(changes: Sequence[Change]) -> list[tuple[str | None, list[Change]]]:
    """Changes grouped by service in report order (the mesh's first, as compare sorts them)."""
    groups: dict[str | None, list[Change]] = {}
    for change in changes:
        groups.setdefault(change.service, []).append(change)
    return sorted(groups.items(), key=lambda item: item[0] is not None)  # stable: mesh first, then as given


def _place(change: Change, shown: ShowFile) -> str:
    if change.file is None:
        return ""
    return shown(change.file) + ("" if change.line is None else f":{change.line}")


def _shares(backends: Mapping[str, int]) -> str:
    return ", ".join(f"{version} {share}%" for version, share in backends.items()) or "no versions"


def describe_outcome(outcome: Outcome) -> str:
    """Where a request went on one side, in a few words: `v2 100%`, `404 no-route`,
    `403 denied at v1 80%, v3 20%` (the versions whose proxies refuse it)."""
    if outcome.error is not None:
        return outcome.error
    response = outcome.response
    if response is not None:
        said = f"{response.get('status')} {response.get('reason')}"
        if outcome.backends is not None and response.get("reason") in _AT_DESTINATION:
            # Routed first, then refused by the destination's proxy: where it went matters.
            said += " at " + _shares({version: share for version, share in outcome.backends.items() if share})
    elif outcome.backends is None:
        said = "no route"
    else:
        said = _shares(outcome.backends)
    if outcome.allowed is False and response is None:
        said += " (audit: would be denied)"
    return said


def _requests_in_order(requests: Sequence[RequestImpact]) -> list[RequestImpact]:
    """Changed requests first, each group in report order (golden first, then the file's)."""
    return sorted(requests, key=lambda r: not r.changed)


def _test_lines(tests: TestChanges) -> list[tuple[str, tuple[str, ...]]]:
    return [(what, names) for what, names in (("added", tests.added), ("removed", tests.removed), ("changed", tests.changed)) if names]


# -- text ----------------------------------------------------------------------------------------


def _side_line(role: str, label: str, digest: str) -> Text:
    text = Text(f"{role}  ")
    text.append(printable(label), style="bold")
    text.append(f"  {short(digest)}", style=_STYLE_PLACE)
    return text


def _risk_text(labels: Sequence[str]) -> Text:
    text = Text()
    for label in sorted_risks(labels):
        text.append("  ")
        text.append(f"[{printable(label)}]", style=_STYLE_SERIOUS if label in _SERIOUS else _STYLE_RISK)
    return text


def render_text(console: Console, report: DiffReport, *, shown: ShowFile = str) -> None:
    """The report for people (module docs); `shown` turns a policy-root-relative file
    into the path to print."""
    console.print(Text("starmesh diff", style="bold"))
    console.print(_side_line("base", report.base.label, report.base.digest))
    console.print(_side_line("head", report.head.label, report.head.digest))
    console.print()
    if not report.changes:
        console.print(Text(NO_CHANGE, style="bold green"))
    for service, changes in _by_service(report.changes):
        console.print(Text(printable(service) if service is not None else "mesh", style="bold"))
        for change in changes:
            line = Text("  " + printable(change.summary))
            line.append_text(_risk_text(change.risk))
            place = _place(change, shown)
            if place:
                line.append("  " + printable(place), style=_STYLE_PLACE)
            console.print(line)
    if report.changes:
        console.print()
        console.print(Text(tally(report), style="bold"))
    tests = _test_lines(report.request_tests)
    if tests:
        console.print()
        console.print(Text("golden requests (request_test), checks only:", style="bold"))
        for what, names in tests:
            console.print(Text(printable(f"  {what}: " + ", ".join(json.dumps(n, ensure_ascii=False) for n in names))))
    if report.requests:
        console.print()
        _requests_table(console, report.requests)


def _requests_table(console: Console, requests: Sequence[RequestImpact]) -> None:
    """A plain table, columns padded by cell width, no trailing blanks (grep-able, diffable)."""
    changed = sum(1 for r in requests if r.changed)
    console.print(Text(f"requests: {len(requests)} tried, {changed} changed", style="bold"))
    header = ("REQUEST", "FROM", "BEFORE", "AFTER", "CHANGED")
    rows = [
        (
            printable(impact.name),
            impact.origin,
            printable(describe_outcome(impact.before)),
            printable(describe_outcome(impact.after)),
            ", ".join(impact.changed) or "-",
        )
        for impact in _requests_in_order(requests)
    ]
    widths = [max(cell_len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str], last_style: str = "") -> Text:
        text = Text("  ".join(cell + " " * (width - cell_len(cell)) for cell, width in zip(cells[:-1], widths)))
        text.append("  ")
        text.append(cells[-1], style=last_style)
        return text

    console.print(line(header), style="bold")
    for row in rows:
        console.print(line(row, _STYLE_CHANGED if row[-1] != "-" else ""))


# -- Markdown --------------------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!])")


def _md(text: str) -> str:
    """Text for a Markdown table cell or line: one line, punctuation that Markdown or
    HTML would act on backslashed (a `|` included, so cells stay cells)."""
    flat = " ".join(printable(text.replace("\n", " ").replace("\r", " ")).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat)


def _code(text: str) -> str:
    """`text` as inline code in a table cell: fenced with more backticks than it holds,
    `|` escaped (GitHub reads a table's pipes before code spans)."""
    flat = " ".join(printable(text).split()).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


def render_markdown(report: DiffReport, *, shown: ShowFile = str) -> str:
    """The report as Markdown for a pull-request comment (module docs); ends with a newline."""
    base, head = report.base, report.head
    lines = [f"### starmesh diff: {_md(base.label)} → {_md(head.label)}", ""]
    if report.changes:
        lines += [f"**{_md(tally(report))}**", ""]
        lines += ["| Service | Change | Risk | Policy |", "|---|---|---|---|"]
        for service, changes in _by_service(report.changes):
            for change in changes:
                risks = ", ".join(f"**{_md(label)}**" for label in sorted_risks(change.risk)) or "—"
                place = _place(change, shown)
                cells = [_md(service) if service is not None else "*mesh*", _md(change.summary), risks, _code(place) if place else "—"]
                lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No change in behaviour.")
    lines.append("")
    tests = _test_lines(report.request_tests)
    if tests:
        lines += ["**Golden requests** (`request_test`, checks only):", ""]
        lines += [f"- {what}: " + ", ".join(_code(name) for name in names) for what, names in tests]
        lines.append("")
    if report.requests:
        lines += _markdown_requests(report.requests)
    lines.append(f"<sub>base {_md(short(base.digest))} · head {_md(short(head.digest))}</sub>")
    return "\n".join(lines) + "\n"


def _markdown_requests(requests: Sequence[RequestImpact]) -> list[str]:
    changed = sum(1 for r in requests if r.changed)
    summary = f"Requests: {len(requests)} tried, {changed} changed"
    rows = ["| Request | From | Before | After | Changed |", "|---|---|---|---|---|"]
    for impact in _requests_in_order(requests):
        flags = ", ".join(f"**{flag}**" for flag in impact.changed) or "—"
        cells = [_md(impact.name), impact.origin, _md(describe_outcome(impact.before)), _md(describe_outcome(impact.after)), flags]
        rows.append("| " + " | ".join(cells) + " |")
    if changed and len(requests) < _DETAILS_FROM:
        return [f"**{summary}**", "", *rows, ""]
    return ["<details>", f"<summary>{summary}</summary>", "", *rows, "", "</details>", ""]


# -- JSON ------------------------------------------------------------------------------------------


def render_json(report: DiffReport) -> str:
    """DESIGN.md's Diff JSON (`DiffReport.to_json()`), indented; no final newline."""
    document: dict[str, Any] = report.to_json()
    return json.dumps(document, indent=2, ensure_ascii=False)
