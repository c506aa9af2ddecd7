"""`starmesh control-plane` (being built for issue 4)."""

from __future__ import annotations

import click

from starmesh.cli.compile import InputError

__all__ = ["control_plane_command"]


@click.command("control-plane")
def control_plane_command() -> None:
    """(being built for issue 4)"""
    raise InputError("starmesh control-plane is being built (issue 4)")
