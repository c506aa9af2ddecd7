"""`starmesh`: the command-line entry point.

Exit codes for every command (DESIGN.md): 0 success, 1 the thing checked is not fine
(lint findings, verification failed), 2 bad usage or input.
"""

from __future__ import annotations

import click

from starmesh.cli.ca import ca_group
from starmesh.cli.compile import compile_command
from starmesh.cli.console import Consoles
from starmesh.cli.control_plane import control_plane_command
from starmesh.cli.diff import diff_command
from starmesh.cli.explain import explain_command
from starmesh.cli.keygen import keygen_command
from starmesh.cli.lint import lint_command
from starmesh.cli.proxy import proxy_command
from starmesh.cli.rollback import rollback_command
from starmesh.cli.status import status_command
from starmesh.cli.up import up_command
from starmesh.cli.verify import verify_command

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


main.add_command(lint_command)
main.add_command(compile_command)
main.add_command(diff_command)
main.add_command(explain_command)
main.add_command(proxy_command)
main.add_command(keygen_command)
main.add_command(control_plane_command)
main.add_command(status_command)
main.add_command(rollback_command)
main.add_command(verify_command)
main.add_command(up_command)
main.add_command(ca_group)
