"""`starmesh lint`: check a policy tree and report findings (text, JSON or GitHub annotations)."""

from __future__ import annotations

from pathlib import Path

import click

from starmesh.cli.compile import ENTRY_HELP, load_policy, policy_files
from starmesh.cli.console import Consoles
from starmesh.cli.options import format_option
from starmesh.cli.render import render_concise, render_full, render_github, render_json, render_summary

__all__ = ["lint_command"]


@click.command("lint")
@click.argument("path", default=".", metavar="[PATH]", type=click.Path(path_type=Path))
@format_option(
    "text for people, json for tools, github for GitHub Actions annotations.", choices=("text", "json", "github")
)
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on errors.")
@click.option("--entry", default="mesh.star", show_default=True, metavar="FILE", help=ENTRY_HELP)
@click.option("--concise", is_flag=True, help="Text format: one file:line:col: CODE message line per finding.")
@click.pass_context
def lint_command(
    ctx: click.Context, path: Path, output_format: str, strict: bool, entry: str, concise: bool
) -> None:
    """Check the policy tree at PATH (default: the current directory).

    Evaluates the Starlark from the entry file, validates every builtin call, runs the
    lint rules and the golden requests (request_test), and reports each finding with
    file:line:col, a rule code, a message and a hint. Exit status: 0 when there are no
    errors (warnings alone pass unless --strict), 1 when there are findings that fail,
    2 on bad usage or when the tree or entry file cannot be read.

    \b
    Examples:
      starmesh lint                              # ./mesh.star
      starmesh lint . --strict                   # warnings fail too
      starmesh lint . --format json | jq '.findings[].code'
      starmesh lint --format github               # in a GitHub Actions step
    """
    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    result = load_policy(path, entry)
    files = policy_files(path, result)
    if output_format == "json":
        click.echo(render_json(result.findings))
    elif output_format == "github":
        for line in render_github(result.findings, files):
            click.echo(line)
    else:
        if concise:
            render_concise(consoles.out, result.findings, files)
        else:
            render_full(consoles.out, result.findings, files)
        render_summary(consoles.out, result.errors, result.warnings)
    failed = result.errors > 0 or (strict and result.warnings > 0)
    ctx.exit(1 if failed else 0)
