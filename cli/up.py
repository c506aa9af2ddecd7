"""`starmesh up` (being built for issue 8)."""

from __future__ import annotations

import click

from starmesh.cli.compile import InputError

__all__ = ["up_command"]


@click.command("up")
def up_command() -> None:
    """(being built for issue 8)"""
    raise InputError("starmesh up is being built (issue 8)")
