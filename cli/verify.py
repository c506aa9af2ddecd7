"""`starmesh verify` (being built for issue 4)."""

from __future__ import annotations

import click

from starmesh.cli.compile import InputError

__all__ = ["verify_command"]


@click.command("verify")
def verify_command() -> None:
    """(being built for issue 4)"""
    raise InputError("starmesh verify is being built (issue 4)")
