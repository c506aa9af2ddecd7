"""`starmesh keygen` (being built for issue 4)."""

from __future__ import annotations

import click

from starmesh.cli.compile import InputError

__all__ = ["keygen_command"]


@click.command("keygen")
def keygen_command() -> None:
    """(being built for issue 4)"""
    raise InputError("starmesh keygen is being built (issue 4)")
