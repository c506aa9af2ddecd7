"""Collecting the findings of building a Spec, and describing values in messages.

The builder keeps going after a problem so one run reports as much as it can; a value
that failed its check becomes `INVALID`, which tells every later step "already
reported, build nothing from this" so one mistake gives one finding, not a cascade.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any, Final

from starmesh.bundle.spec import SourceLocation
from starmesh.compiler.calls import Call
from starmesh.compiler.codes import CODES
from starmesh.compiler.diagnostics import Finding

__all__ = ["INVALID", "Invalid", "Reporter", "describe", "type_name"]


class Invalid(enum.Enum):
    """The type of `INVALID`: a value whose problem has already been reported."""

    INVALID = "INVALID"


INVALID: Final = Invalid.INVALID


class Reporter:
    """Gathers findings; severity comes from the code table (compiler/codes.py)."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def report(self, where: SourceLocation, code: str, message: str, hint: str | None = None) -> None:
        self.findings.append(Finding.at(where, code, CODES[code].severity, message, hint))

    def at_call(self, call: Call, code: str, message: str, hint: str | None = None) -> None:
        """A finding at `call`; a call a `@starmesh//` macro made says which macro."""
        if call.via:
            message = f"{message} (in {' > '.join(call.via)})"
        self.report(call.location, code, message, hint)

    @property
    def has_errors(self) -> bool:
        return any(f.is_error for f in self.findings)


def type_name(value: object) -> str:
    """The Starlark name of a value's type, as users see it."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, Call):
        return f"{value.builtin}(...)"
    return type(value).__name__


_SHORT = 40
_ITEMS = 4


def describe(value: Any) -> str:
    """`string "80"`, `int 80`, `list ["a", "b"]`, `circuit_breaker(...)`: type and a short value."""
    if isinstance(value, Call):
        return f"{value.builtin}(...)"
    if value is None:
        return "None"
    return f"{type_name(value)} {_short(value)}"


def _short(value: Any) -> str:
    text = _starlark_repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def _starlark_repr(value: Any) -> str:
    if isinstance(value, str):
        value = value[: _SHORT + 1]
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        items = [_starlark_repr(v) for v in value[:_ITEMS]]
        return "[" + ", ".join(items + (["..."] if len(value) > _ITEMS else [])) + "]"
    if isinstance(value, dict):
        pairs = [f"{_starlark_repr(k)}: {_starlark_repr(v)}" for k, v in itertools.islice(value.items(), _ITEMS)]
        return "{" + ", ".join(pairs + (["..."] if len(value) > _ITEMS else [])) + "}"
    if isinstance(value, Call):
        return f"{value.builtin}(...)"
    return repr(value)
