"""Whom the command line asks: the `--control-plane` URLs of every replica, in order.

    --control-plane A --control-plane B --control-plane C
        ReplicaURLs.ask(call): A ─✗─► B ─✓─► the answer, from B; A's failure kept as "skipped"
                               (the next call asks B first: a dead replica costs a
                               timeout once, not at every `status --watch` refresh)

`starmesh status` and `starmesh rollback` both take the option (`control_planes_option`)
and ask through `ReplicaURLs`; each command decides what moves on to the next URL by
raising InputError from its `call` (status: anything that is not a status document;
rollback: an unreachable replica or a 503) and what is final by returning it. Only when
no URL answers does the command fail (exit 2), with every URL's reason; with one URL the
message is that URL's alone, as before replicas existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import click

from starmesh.cli.control_client import base_url
from starmesh.cli.errors import InputError

__all__ = ["Reached", "ReplicaURLs", "control_planes_option"]

T = TypeVar("T")


@dataclass(frozen=True)
class Reached(Generic[T]):
    """What one replica answered (`value`), its URL, and why the URLs asked before it failed."""

    value: T
    url: str
    skipped: tuple[str, ...] = ()


class ReplicaURLs:
    """The `--control-plane` URLs, asked in order until one answers.

    The URL that answered moves to the front, so the next call (a `--watch` refresh)
    asks it first."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._order = list(dict.fromkeys(urls))
        if not self._order:
            raise ValueError("no --control-plane URL")

    @property
    def urls(self) -> tuple[str, ...]:
        """The URLs in the order the next call asks them."""
        return tuple(self._order)

    def ask(self, call: Callable[[str], T]) -> Reached[T]:
        """`call(url)` for each URL until one returns; InputError when every one raised it."""
        failures: list[InputError] = []
        for url in list(self._order):
            try:
                value = call(url)
            except InputError as exc:
                failures.append(exc)
                continue
            self._order.remove(url)
            self._order.insert(0, url)
            return Reached(value, url, tuple(exc.format_message() for exc in failures))
        if len(failures) == 1:
            raise failures[0]
        reasons = "; ".join(exc.format_message() for exc in failures)
        raise InputError(f"none of the {len(failures)} --control-plane URLs answered: {reasons}")


def _check_urls(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Every URL http(s):// with a host and no query: a typo fails at once, before any is asked."""
    for url in values:
        base_url(url)
    return values


control_planes_option = click.option(
    "--control-plane",
    "urls",
    required=True,
    multiple=True,
    callback=_check_urls,
    metavar="URL",
    help="The control plane's base URL; repeat it for each replica (asked in order until one answers).",
)
"""`--control-plane URL`, repeatable (the parameter is `urls`)."""
