"""`starmesh`: the command-line entry point.

Exit codes for every command (DESIGN.md): 0 success, 1 the thing checked is not fine
(lint findings, verification failed), 2 bad usage or input.

Subcommands load lazily (click's LazyGroup pattern): running one imports its module
alone, so `starmesh proxy` carries no compiler, Git or preview code in its idle memory.
`starmesh --help` imports them all, for their short help.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click

from starmesh.cli.console import Consoles

__all__ = ["main"]

COMMANDS: Mapping[str, str] = {
    "ca": "starmesh.cli.ca:ca_group",
    "compile": "starmesh.cli.compile:compile_command",
    "control-plane": "starmesh.cli.control_plane:control_plane_command",
    "diff": "starmesh.cli.diff:diff_command",
    "explain": "starmesh.cli.explain:explain_command",
    "keygen": "starmesh.cli.keygen:keygen_command",
    "lint": "starmesh.cli.lint:lint_command",
    "proxy": "starmesh.cli.proxy:proxy_command",
    "rollback": "starmesh.cli.rollback:rollback_command",
    "status": "starmesh.cli.status:status_command",
    "up": "starmesh.cli.up:up_command",
    "verify": "starmesh.cli.verify:verify_command",
}
"""Every subcommand: its name -> "module:attribute" of its click command (or group)."""


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when one is asked for by name.

    `lazy` maps a command's name to "module:attribute"; the name must be the command's
    own (checked on loading), so `--help` and the command agree."""

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command) or command.name != cmd_name:
            raise TypeError(f"{target} is not the click command {cmd_name!r}")
        return command


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="starmesh")
@click.pass_context
def main(ctx: click.Context) -> None:
    """starmesh: policy-as-code GitOps service mesh.

    Mesh policy is written in Starlark in a Git repository; `starmesh lint` checks it
    and `starmesh compile` turns it into a canonical, content-addressed bundle.

    \b
    Examples:
      starmesh lint examples/bookinfo/policies
      starmesh compile examples/bookinfo/policies -o bundle.json
    """
    if ctx.obj is None:
        ctx.obj = Consoles.for_process()
