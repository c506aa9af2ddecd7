"""`starmesh`: the command-line entry point."""

from __future__ import annotations

import click

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="starmesh")
def main() -> None:
    """starmesh: policy-as-code GitOps service mesh."""
