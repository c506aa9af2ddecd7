"""`starmesh status` (being built for issue 4)."""

from __future__ import annotations

import click

from starmesh.cli.compile import InputError

__all__ = ["status_command"]


@click.command("status")
def status_command() -> None:
    """(being built for issue 4)"""
    raise InputError("starmesh status is being built (issue 4)")
