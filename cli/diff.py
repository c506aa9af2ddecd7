"""`starmesh diff`: what a policy change does to the mesh, before it rolls out.

    [BASE [HEAD]] / --against URL ──diff_sides──► two compiled bundles (+ their Sides)
        └─► preview.report.compare(base, head, requests=--requests FILE) ──► DiffReport
              └─► diff_render: text | markdown | json ──► stdout

Which sides (docs/preview.md):

    starmesh diff                       HEAD            vs the working tree
    starmesh diff BASE                  BASE            vs the working tree
    starmesh diff BASE HEAD             BASE            vs HEAD (two commits)
    starmesh diff --against URL [REV]   what the control plane serves now vs REV or the working tree

Both sides are compiled; the bundles are compared on behaviour only, so a commit that
edits comments or formatting says "no change in behaviour". Exit codes, as `git diff`:
0, or with `--exit-code` 1 when behaviour changed; 2 for bad input (an unknown
revision, no repository, an unreachable control plane, a bundle that does not match
its digest, a bad requests file) and for a side that does not compile (its findings
are printed first, as `starmesh compile` prints them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from starmesh.cli.compile import ENTRY_HELP, policy_files
from starmesh.cli.console import Consoles
from starmesh.cli.errors import InputError
from starmesh.cli.options import ca_cert_option, format_option
from starmesh.cli.render import PolicyFiles, render_full, render_summary

if TYPE_CHECKING:
    from starmesh.cli.diff_sides import CompiledSide
    from starmesh.preview.impact import SampleRequest

__all__ = ["diff_command"]


@click.command("diff")
@click.argument("revisions", nargs=-1, metavar="[BASE [HEAD]]")
@click.option(
    "--repo",
    "root",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="PATH",
    help="The policy root (the folder holding mesh.star); may be a folder inside the Git work tree.",
)
@click.option("--against", metavar="URL", help="Compare with the bundle this control plane serves now (the base).")
@ca_cert_option
@click.option("--entry", default="mesh.star", show_default=True, metavar="FILE", help=ENTRY_HELP)
@format_option(
    "text for people, markdown for a pull-request comment, json for tools.", choices=("text", "json", "markdown")
)
@click.option("--exit-code", is_flag=True, help="Exit 1 when behaviour changed, 0 when not (as git diff --exit-code).")
@click.option(
    "--requests",
    "requests_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="A JSON list of requests to try on both sides (the golden requests are always tried).",
)
@click.pass_context
def diff_command(
    ctx: click.Context,
    revisions: tuple[str, ...],
    root: Path,
    against: str | None,
    ca_cert: Path | None,
    entry: str,
    output_format: str,
    exit_code: bool,
    requests_file: Path | None,
) -> None:
    """Show how the policy's behaviour changes between two versions of it.

    BASE and HEAD are Git revisions of the policy repository. Without them, HEAD is
    compared with the working tree; with BASE alone, BASE with the working tree. With
    --against URL the base is the bundle the control plane serves now, and a single
    revision, if given, is the head. Every change carries its risk (widens access,
    shifts N% of traffic, removes protection, ...) and the policy line behind it. A
    change in comments or formatting alone is "no change in behaviour".

    Exit 0, or with --exit-code 1 when behaviour changed; 2 on bad input or when a side
    does not compile.

    \b
    Examples:
      starmesh diff                                  # HEAD vs the working tree
      starmesh diff origin/main HEAD --format markdown > diff.md
      starmesh diff --repo policies/ --requests requests.json
      starmesh diff --against https://127.0.0.1:8443 --ca-cert ca.crt
    """
    from starmesh.bundle.errors import BundleError
    from starmesh.cli.diff_render import render_json, render_markdown, render_text
    from starmesh.cli.diff_sides import SideDoesNotCompile
    from starmesh.preview.report import compare

    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    samples = _load_requests(requests_file)
    try:
        base, head = _sides(revisions, root, against, ca_cert, entry)
    except SideDoesNotCompile as failed:
        files = policy_files(root, failed.result)
        render_full(consoles.err, failed.result.findings, files)
        render_summary(consoles.err, failed.result.errors, failed.result.warnings)
        raise
    try:
        report = compare(base.bundle, head.bundle, base_side=base.side, head_side=head.side, requests=samples)
    except BundleError as exc:  # a control plane's bundle this starmesh cannot build a table from
        raise InputError(f"cannot compare {base.side.label} with {head.side.label}: {exc}") from exc
    shown = PolicyFiles(root=root, cwd=Path.cwd()).shown
    if output_format == "json":
        click.echo(render_json(report))
    elif output_format == "markdown":
        click.echo(render_markdown(report, shown=shown), nl=False)
    else:
        render_text(consoles.out, report, shown=shown)
    if exit_code and report.behaviour_changed:
        ctx.exit(1)


def _load_requests(path: Path | None) -> list[SampleRequest]:
    if path is None:
        return []
    from starmesh.preview.impact import RequestsFileError, load_requests

    try:
        return load_requests(path)
    except RequestsFileError as exc:
        raise InputError(f"--requests {exc}") from exc


def _sides(
    revisions: tuple[str, ...], root: Path, against: str | None, ca_cert: Path | None, entry: str
) -> tuple[CompiledSide, CompiledSide]:
    """(base, head) as the arguments name them (the module docs' table)."""
    from starmesh.cli.diff_sides import PolicyRepo, control_plane_side, revision_side, working_tree_side

    if len(revisions) > 2 or (against is not None and len(revisions) > 1):
        usage = "--against URL [HEAD]" if against is not None else "[BASE [HEAD]]"
        raise InputError(f"too many revisions ({' '.join(revisions)}): starmesh diff takes {usage}")
    if ca_cert is not None and against is None:
        raise InputError("--ca-cert is for --against an https:// control plane")
    if against is not None:
        # Read the policy first: a side that does not compile is found before the network is used.
        head = revision_side(PolicyRepo.find(root), revisions[0], entry) if revisions else working_tree_side(root, entry)
        return control_plane_side(against, ca_cert=ca_cert), head
    repo = PolicyRepo.find(root)
    base = revision_side(repo, revisions[0] if revisions else "HEAD", entry)
    head = revision_side(repo, revisions[1], entry) if len(revisions) == 2 else working_tree_side(root, entry)
    return base, head
