"""What several commands take alike: options, and the checks of what they name.

    ca_cert_option                         `status`, `rollback`: how to trust the control plane
                                           (the URLs: cli/control_planes.py)
    file_option(name, help_text)           `NAME FILE`: a file the command reads (`--key`, `--store-ca`)
    format_option(help_text)               `--format text|json` (`lint` adds `github`)
    load_public_keys(paths, where=)        `proxy --trust`, `verify --key`: Ed25519 public keys
    make_state_dir(path)                   `proxy`, `control-plane`: `--state-dir`, created if missing
    seconds_option(name, low, high, ...)   `NAME SECONDS` from low to high (`--leader-ttl`)

A decorator here is one `click.option`; commands stack them in their own order (the
order `--help` shows). Checks raise `InputError` (exit 2) saying which option is wrong.
Heavy imports (the key parser) wait until a check runs, so `starmesh --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from starmesh.cli.errors import InputError

if TYPE_CHECKING:
    from starmesh.bundle.keys import PublicKey

__all__ = [
    "ca_cert_option",
    "file_option",
    "format_option",
    "load_public_keys",
    "make_state_dir",
    "seconds_option",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def file_option(name: str, help_text: str, **more: Any) -> Callable[[_F], _F]:
    """`NAME FILE`, a path (not a directory); the command reads and checks the file itself,
    so its message can say what the file should hold. `more`: e.g. required, multiple."""
    return click.option(name, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE", help=help_text, **more)


def seconds_option(
    name: str, low: float, high: float, help_text: str, *, default: float | None = None
) -> Callable[[_F], _F]:
    """`NAME SECONDS`, a number from `low` to `high`; `default`, when given, shows in `--help`."""
    shown: dict[str, Any] = {} if default is None else {"default": default, "show_default": True}
    return click.option(name, type=click.FloatRange(min=low, max=high), metavar="SECONDS", help=help_text, **shown)


ca_cert_option = file_option("--ca-cert", "For an https:// control plane: the mesh root certificate to trust.")
"""`--ca-cert FILE` (the parameter is `ca_cert`)."""


def format_option(help_text: str, choices: tuple[str, ...] = ("text", "json")) -> Callable[[_F], _F]:
    """`--format` (the parameter is `output_format`), text by default; `help_text` says what each is for."""
    return click.option(
        "--format",
        "output_format",
        type=click.Choice(list(choices)),
        default="text",
        show_default=True,
        help=help_text,
    )


def load_public_keys(paths: Iterable[Path], *, where: str) -> tuple[PublicKey, ...]:
    """The Ed25519 public keys in `paths` (PEM SubjectPublicKeyInfo).

    InputError `"{where} {why}"` for the first file that is not one (`why` names the file)."""
    from starmesh.bundle.errors import BundleError
    from starmesh.bundle.keys import load_public_key

    keys = []
    for path in paths:
        try:
            keys.append(load_public_key(path))
        except BundleError as exc:
            raise InputError(f"{where} {exc}") from exc
    return tuple(keys)


def make_state_dir(state_dir: Path) -> None:
    """Create `--state-dir` (and its parents) if missing; InputError when it cannot be."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--state-dir {state_dir}: cannot create it: {exc.strerror or exc}") from exc
