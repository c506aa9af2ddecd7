"""`starmesh status` and control-plane replicas: what the replicas say.

Whom to ask (the `--control-plane` URLs, in order) is control_planes.py's, shared with
`starmesh rollback`.

    /v1/status "control_plane" (with `control-plane --store`, docs/ha.md)
        {"id", "role", "leader": {id, url, since} | null,
         "replicas": [{id, url, role, started_at, seen_at}],
         "store": {kind, available, read_only, since, error, member, revision}}
        ─► control_plane_lines(): replica, leader, store, and the warnings
        ─► replica_table():       one row per replica

A replica that cannot be reached, answers an HTTP error or answers something that is
not a status document is skipped and the next URL is asked; only when none answers does
the command fail (exit 2), with every URL's reason.

A status without `control_plane` (a control plane without `--store`) shows nothing of
this. Every field of the object is optional here, so an older or newer control plane's
document still renders; ages come from the replica's own `seen_seconds_ago` when it
gives one (its clock), else from `seen_at` and the local clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec
from rich.console import RenderableType
from rich.text import Text

from starmesh.cli.control_client import printable

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["NO_LEADER", "ControlPlaneInfo", "control_plane_lines", "read_only_warning", "replica_table"]

NO_LEADER = "no leader: releases are frozen, proxies keep their last release"
"""The warning shown when the answering replica knows of no leader."""

LABEL = 15
"""Width of the summary lines' label column (`control plane  `), as status.py prints it."""


def read_only_warning(since: str | None) -> str:
    """The warning shown while the answering replica's store is unavailable."""
    when = f" since {since}" if since else ""
    return f"etcd is unreachable{when}: the control plane is serving the last release read-only"


# -- the document's `control_plane` object ------------------------------------------------


class LeaderRef(msgspec.Struct, frozen=True):
    """The leader the answering replica knows of."""

    id: str | None = None
    url: str | None = None
    since: str | None = None


class ReplicaRow(msgspec.Struct, frozen=True):
    """One replica, as registered in the store (`replicas/<id>`)."""

    id: str | None = None
    url: str | None = None
    role: str | None = None
    started_at: str | None = None
    seen_at: str | None = None
    seen_seconds_ago: float | None = None


class StoreState(msgspec.Struct, frozen=True):
    """The answering replica's store: available, or read-only since when and why."""

    kind: str | None = None
    available: bool | None = None
    read_only: bool | None = None
    since: str | None = None
    error: str | None = None
    member: str | None = None
    revision: int | None = None


class ControlPlaneInfo(msgspec.Struct, frozen=True):
    """`/v1/status`'s `control_plane`: the answering replica, the leader, every replica, the store."""

    id: str | None = None
    role: str | None = None
    leader: LeaderRef | None = None
    replicas: list[ReplicaRow] = []
    store: StoreState | None = None
    problems: list[str] = []  # replicas that disagree (another signing key, repo or branch)


# -- rendering -------------------------------------------------------------------------------


def _line(label: str, text: str, style: str | None = None) -> Text:
    return Text(printable(f"{label:<{LABEL}}{text}"), style=style or "")


def control_plane_lines(info: ControlPlaneInfo) -> list[RenderableType]:
    """`replica`, `leader` and `store` summary lines, then a `warning` line for no leader,
    for a read-only store (bold red: releases are frozen while either lasts) and for each
    problem the replica reports (replicas that sign with another key, follow another
    repository or branch)."""
    lines: list[RenderableType] = [_line("replica", f"{info.id or '?'}  {info.role or '?'}")]
    warnings: list[str] = []
    leader = info.leader
    if leader is None:
        lines.append(_line("leader", "none"))
        warnings.append(NO_LEADER)
    else:
        since = f"  since {leader.since}" if leader.since else ""
        lines.append(_line("leader", f"{leader.id or '?'}  {leader.url or '-'}{since}"))
    store = info.store
    if store is not None:
        read_only = bool(store.read_only) or store.available is False
        parts = [store.kind or "?"]
        if read_only:
            parts.append("read-only" + (f" since {store.since}" if store.since else ""))
            if store.error:
                parts.append(store.error)
        else:
            parts.append("available")
        if store.member:
            parts.append(f"{'last member' if read_only else 'member'} {store.member}")
        if store.revision is not None:
            parts.append(f"revision {store.revision}")
        lines.append(_line("store", "  ".join(parts), "yellow" if read_only else None))
        if read_only:
            warnings.append(read_only_warning(store.since))
    warnings.extend(info.problems)
    lines.extend(_line("warning", text, "bold red") for text in warnings)
    return lines


_COLUMNS = ("REPLICA", "URL", "ROLE", "STARTED", "LAST SEEN")


def replica_table(info: ControlPlaneInfo, now: datetime, ago: Callable[[int], str]) -> Table:
    """One row per replica, by id; the leader bold, the answering replica marked `*`.

    `ago(seconds)` words an age as the proxy table does."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in _COLUMNS:
        table.add_column(column, no_wrap=True, justify="right" if column == "LAST SEEN" else "left")
    leader_id = info.leader.id if info.leader is not None else None
    for replica in sorted(info.replicas, key=lambda r: r.id or ""):
        name = (replica.id or "?") + (" *" if replica.id is not None and replica.id == info.id else "")
        cells = [name, replica.url or "-", replica.role or "-", replica.started_at or "-", _seen(replica, now, ago)]
        style = "bold" if replica.id is not None and replica.id == leader_id else None
        table.add_row(*(Text(printable(cell)) for cell in cells), style=style)
    return table


def _seen(replica: ReplicaRow, now: datetime, ago: Callable[[int], str]) -> str:
    """The age of the replica's last refresh: its own count of seconds when given, else
    `seen_at` against the local clock (the stamp itself when that clock is behind)."""
    if replica.seen_seconds_ago is not None:
        return ago(int(replica.seen_seconds_ago))
    if not replica.seen_at:
        return "-"
    try:
        seconds = int((now - datetime.fromisoformat(replica.seen_at)).total_seconds())
    except (ValueError, TypeError):
        return replica.seen_at
    return replica.seen_at if seconds < 0 else ago(seconds)
