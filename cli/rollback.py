"""`starmesh rollback` (being built for issue 4)."""

from __future__ import annotations

import click

from starmesh.cli.compile import InputError

__all__ = ["rollback_command"]


@click.command("rollback")
def rollback_command() -> None:
    """(being built for issue 4)"""
    raise InputError("starmesh rollback is being built (issue 4)")
