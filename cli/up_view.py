"""What `starmesh up` shows: its steps, what runs where, and the mesh while it runs.

Two views with one interface (`View`):

    PlainView   stdout is not a terminal (scripts, tests, CI logs): stable lines, one per
                step and one per change, that a program can parse:
                  [5/7] control plane: https://127.0.0.1:40123, release 1 sha256:…
                  productpage http://127.0.0.1:41000/productpage      (the entry, once)
                  control plane https://127.0.0.1:40123                (once)
                  mesh CA /abs/.starmesh/ca/ca.crt (trust domain …)    (once)
                  policy repo /abs/.starmesh/repo                      (once)
                  running (Ctrl-C to stop)
                  release 2 applied everywhere (commit 1a2b3c4d5e6f)
    LiveView    a terminal: a spinner per step (rich.live), the same facts as tables, then
                a live status table refreshed every second.

`ChangeTracker` turns two successive MeshStatus polls into the change lines.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from starmesh.cli.localmesh_status import MeshStatus
from starmesh.cli.status import short

if TYPE_CHECKING:
    from starmesh.cli.localmesh import LocalMesh
    from starmesh.cli.localmesh_children import Child

__all__ = ["STEPS", "ChangeTracker", "LiveView", "PlainView", "View", "facts", "make_view", "next_steps"]

STEPS = ("lock", "policy repo", "signing key", "mesh identity", "control plane", "apps and sidecars", "sync")


def next_steps(mesh: LocalMesh) -> list[str]:
    """up.json's "try" lines ({entry} filled in), then the GitOps loop on the policy repo."""
    entry, plane, repo = mesh.entry, mesh.control_plane, mesh.repo
    assert entry is not None and plane is not None
    lines = [line.replace("{entry}", entry.inbound) for line in mesh.example.tries]
    lines += [
        f"edit {repo.policy_root / 'mesh.star'} (and lib/*.star)",
        f"starmesh lint {repo.policy_root}",
        f'git -C {repo.path} commit -am "what changed"   (released within seconds)',
        f"starmesh status --control-plane {plane.url} --ca-cert {mesh.identity.ca_cert}",
    ]
    return lines


def facts(mesh: LocalMesh) -> list[tuple[str, str]]:
    """(label, value) for what runs where, entry first; the labels PlainView prints."""
    entry, plane, repo = mesh.entry, mesh.control_plane, mesh.repo
    assert entry is not None and plane is not None
    identity = mesh.identity
    rows = [
        (mesh.example.entry.service, f"http://{entry.inbound}{mesh.example.entry.path}"),
        ("control plane", plane.url),
        ("mesh CA", f"{identity.ca_cert} (trust domain {identity.trust_domain})"),
        ("status", f"starmesh status --control-plane {plane.url} --ca-cert {identity.ca_cert}"),
        ("policy repo", str(repo.path)),
    ]
    if repo.subdir:
        rows.append(("policy root", str(repo.policy_root)))
    rows.append(("state dir", f"{mesh.layout.root}  (logs in {mesh.layout.logs})"))
    return rows


class ChangeTracker:
    """Successive MeshStatus polls in, one line per change out."""

    def __init__(self, ids: Sequence[str], first: MeshStatus) -> None:
        self.ids = tuple(ids)
        self.last = first
        self.everywhere = first.release_version if first.all_on(self.ids, first.release_version or -1) else None

    def lines(self, now: MeshStatus) -> list[str]:
        before, self.last = self.last, now
        if not now.reachable:
            return [] if not before.reachable else [f"control plane not answering: {now.error}"]
        out = [] if before.reachable else ["control plane answering again"]
        if now.release_version is not None and now.release_version != before.release_version:
            commit, bundle = short(now.release_commit), short(now.release_bundle)
            out.append(f"release {now.release_version} issued (commit {commit}, {bundle})")
        if now.compile_commit != before.compile_commit and now.compile_ok is False:
            out.append(f"commit {short(now.compile_commit)} rejected: {now.first_diagnostic or 'see starmesh status'}")
        if now.rollout_phase != before.rollout_phase and now.rollout_phase in ("canary", "baking", "halted"):
            out.append(f"rollout of release {now.rollout_version}: {now.rollout_phase}")
        was = {p.id: p for p in before.proxies}
        for proxy in now.proxies:
            changed = was.get(proxy.id, proxy).state != proxy.state
            if proxy.id in self.ids and proxy.state in ("failed", "stale") and changed:
                out.append(f"proxy {proxy.id} {proxy.state}" + (f": {proxy.error}" if proxy.error else ""))
        version = now.release_version
        if version is not None and version != self.everywhere and now.all_on(self.ids, version):
            self.everywhere = version
            out.append(f"release {version} applied everywhere (commit {short(now.release_commit)})")
        return out


class View(Protocol):
    """What `starmesh up` tells its user, in the order it happens."""

    def step(self, index: int, detail: str, *, done: bool = True) -> None: ...
    def failed(self, message: str) -> None: ...
    def running(self, mesh: LocalMesh, first: MeshStatus) -> None: ...
    def update(self, status: MeshStatus, exited: Sequence[Child]) -> None: ...
    def stopping(self) -> None: ...
    def stopped(self, killed: Sequence[Child]) -> None: ...
    def close(self) -> None: ...


def _echo(line: str, err: bool = False) -> None:
    click.echo(line, err=err)


class PlainView:
    """Stable lines on stdout (errors on stderr), flushed as they happen."""

    def __init__(self) -> None:
        self._tracker: ChangeTracker | None = None
        self._last_step = ""

    def step(self, index: int, detail: str, *, done: bool = True) -> None:
        line = f"[{index + 1}/{len(STEPS)}] {STEPS[index]}: {detail}"
        if line != self._last_step:  # progress repeats itself between changes
            _echo(line)
            self._last_step = line

    def failed(self, message: str) -> None:
        _echo(f"starmesh: error: {message}", err=True)

    def running(self, mesh: LocalMesh, first: MeshStatus) -> None:
        for label, value in facts(mesh):
            _echo(f"{label} {value}")
        _echo("services:")
        for i in mesh.instances:
            _echo(
                f"  {i.app.service} {i.app.version}  app {i.address}  sidecar outbound {i.outbound}"
                f"  inbound {i.inbound}  admin {i.admin_url} (/metrics, /config)"
            )
        _echo("next things to try:")
        for line in next_steps(mesh):
            _echo(f"  {line}")
        if first.compile_ok is False:
            _echo(f"commit {short(first.compile_commit)} rejected: {first.first_diagnostic or 'see starmesh status'}")
        _echo("running (Ctrl-C to stop)")
        self._tracker = ChangeTracker([i.proxy_id for i in mesh.instances], first)

    def update(self, status: MeshStatus, exited: Sequence[Child]) -> None:
        for child in exited:
            _echo(f"{child.describe_exit()}; the rest keep running")
        if self._tracker is not None:
            for line in self._tracker.lines(status):
                _echo(line)

    def stopping(self) -> None:
        _echo("stopping every child (Ctrl-C again to kill them at once)")

    def stopped(self, killed: Sequence[Child]) -> None:
        for child in killed:
            _echo(f"{child.spec.name} did not stop in time and was killed")
        _echo("stopped")

    def close(self) -> None:
        """Nothing to close: every line is already out."""


class LiveView:
    """rich on a terminal: spinners while starting, tables, a live status view."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._details = [""] * len(STEPS)
        self._active = 0
        self._live: Live | None = Live(self._steps(), console=console, refresh_per_second=8, transient=False)
        self._live.start()
        self._mesh: LocalMesh | None = None
        self._exited: list[str] = []

    def _steps(self) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        for i, name in enumerate(STEPS):
            mark: RenderableType
            if i < self._active:
                mark = Text("✓", style="green")
            elif i == self._active:
                mark = Spinner("dots", style="cyan")
            else:
                mark = Text("·", style="dim")
            grid.add_row(mark, Text(name, style="bold" if i <= self._active else "dim"), Text(self._details[i]))
        return grid

    def step(self, index: int, detail: str, *, done: bool = True) -> None:
        self._details[index] = detail
        self._active = index + 1 if done else index
        if self._live is not None:
            self._live.update(self._steps(), refresh=True)

    def _end_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def failed(self, message: str) -> None:
        self._end_live()
        self.console.print(Text(f"starmesh: error: {message}", style="red"))

    def running(self, mesh: LocalMesh, first: MeshStatus) -> None:
        self._end_live()
        self._mesh = mesh
        grid = Table.grid(padding=(0, 2))
        for label, value in facts(mesh):
            grid.add_row(Text(label, style="bold"), Text(value, style="cyan" if value.startswith("http") else ""))
        services = Table(
            title="what runs where (sidecar admin: http://ADMIN/metrics, /config)",
            title_justify="left",
            box=None,
            pad_edge=False,
            header_style="bold",
        )
        for column in ("SERVICE", "VER", "APP", "OUTBOUND", "INBOUND", "ADMIN"):
            services.add_column(column, no_wrap=True)
        for i in mesh.instances:
            services.add_row(i.app.service, i.app.version, i.address, i.outbound, i.inbound, i.admin)
        tries = Text("next things to try:\n", style="bold")
        for line in next_steps(mesh):
            tries.append(f"  {line}\n", style="")
        self.console.print(Group(grid, Text(""), services, Text(""), tries))
        self._live = Live(self._status(first), console=self.console, refresh_per_second=1)
        self._live.start()

    def _status(self, status: MeshStatus) -> RenderableType:
        assert self._mesh is not None
        head = Table.grid(padding=(0, 2))
        if not status.reachable:
            head.add_row(Text("control plane", style="bold"), Text(f"not answering: {status.error}", style="red"))
        else:
            release = f"{status.release_version}  commit {short(status.release_commit)}  {short(status.release_bundle)}"
            head.add_row(Text("release", style="bold"), Text(release))
            if status.compile_ok is False:
                compiled = Text(f"{short(status.compile_commit)} rejected: {status.first_diagnostic}", style="red")
            else:
                compiled = Text(f"{short(status.compile_commit)} ok", style="green")
            head.add_row(Text("last compile", style="bold"), compiled)
            rollout = f"{status.rollout_phase or '-'} (release {status.rollout_version})"
            head.add_row(Text("rollout", style="bold"), Text(rollout))
        proxies = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("SERVICE", "VERSION", "PROXY", "STATE", "RELEASE", "ERROR"):
            proxies.add_column(column, no_wrap=column != "ERROR")
        styles = {"synced": "green", "pending": "yellow", "failed": "red", "stale": "red"}
        for p in status.proxies:
            proxies.add_row(
                p.service, p.version, p.id, Text(p.state, style=styles.get(p.state, "")),
                "-" if p.release_version is None else str(p.release_version), p.error or "",
            )  # fmt: skip
        parts: list[RenderableType] = [head, proxies]
        parts += [Text(line, style="red") for line in self._exited]
        parts.append(Text("running: Ctrl-C to stop", style="dim"))
        return Group(*parts)

    def update(self, status: MeshStatus, exited: Sequence[Child]) -> None:
        self._exited += [f"{child.describe_exit()}; the rest keep running" for child in exited]
        del self._exited[:-10]  # bounded
        if self._live is not None:
            self._live.update(self._status(status))

    def stopping(self) -> None:
        self._end_live()
        self.console.print(Text("stopping every child (Ctrl-C again to kill them at once)", style="dim"))

    def stopped(self, killed: Sequence[Child]) -> None:
        for child in killed:
            self.console.print(Text(f"{child.spec.name} did not stop in time and was killed", style="yellow"))
        self.console.print("stopped")

    def close(self) -> None:
        """End the live display (idempotent)."""
        self._end_live()


def make_view() -> View:
    """LiveView when stdout is a terminal, PlainView otherwise."""
    import os

    if sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
        console = Console(highlight=False, markup=False, emoji=False, no_color=bool(os.environ.get("NO_COLOR")))
        return LiveView(console)
    return PlainView()
