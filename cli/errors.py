"""`InputError`: the command line's "bad usage or input" exception (exit 2, one line).

Its own small module so that every command can raise it without importing another
command's code: `starmesh proxy` raising it must not load the compiler, which is where
`starmesh compile` (its first home) lives.
"""

from __future__ import annotations

import click

__all__ = ["InputError"]


class InputError(click.ClickException):
    """Bad input on the command line (missing tree, unreadable file): exit 2, one line on stderr."""

    exit_code = 2

    def show(self, file: object = None) -> None:
        click.echo(f"starmesh: error: {self.format_message()}", err=True)
