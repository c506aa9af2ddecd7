"""Caps on what a policy hands to builtins: string length, nesting depth, total size.

Starlark values arrive in Python already converted; the meter walks each builtin
call's arguments once (a nested builtin result counts by the depth recorded when it
was made, not walked again) and keeps a running total for the whole evaluation.
"""

from __future__ import annotations

from starmesh.compiler._eval_protocol import Limits
from starmesh.compiler.calls import Call

__all__ = ["MAX_NESTING", "BoundExceeded", "OutputMeter"]

MAX_NESTING = 64
"""Deepest nesting of lists, dicts and builtin results inside one builtin argument."""


class BoundExceeded(Exception):
    """A cap was passed; `message` and `hint` are user-facing (code SM106)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class _TooLong(Exception):
    def __init__(self, chars: int) -> None:
        super().__init__(chars)
        self.chars = chars


class _TooDeep(Exception):
    pass


class OutputMeter:
    """Measures builtin arguments against `Limits` over one evaluation."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self._depth: dict[Call, int] = {}
        self._deepest = 0

    def measure(self, builtin: str, value: object) -> int:
        """Adds `value`'s size to the total and returns its nesting depth."""
        self._deepest = 0
        try:
            size = self._size(value, 0)
        except _TooLong as exc:
            raise BoundExceeded(
                f"a string of {exc.chars} characters passed to {builtin}() exceeds the limit of "
                f"{self.limits.max_string_chars}"
            ) from None
        except _TooDeep:
            raise BoundExceeded(f"a value passed to {builtin}() is nested more than {MAX_NESTING} levels deep") from None
        self.total += size
        if self.total > self.limits.max_output_bytes:
            raise BoundExceeded(
                f"the values passed to builtins exceed {self.limits.max_output_bytes} bytes",
                "look for a loop that builds huge lists or strings",
            )
        return self._deepest

    def made(self, call: Call, depth: int) -> None:
        """Remembers the depth of a builtin's result, for when it is passed on."""
        self._depth[call] = depth

    def _size(self, item: object, depth: int) -> int:
        kind = type(item)
        if kind is str:
            chars = len(item)  # type: ignore[arg-type]
            if chars > self.limits.max_string_chars:
                raise _TooLong(chars)
            return chars + 8
        if kind is list or kind is tuple or kind is dict:
            depth += 1
            if depth > MAX_NESTING:
                raise _TooDeep
            if depth > self._deepest:
                self._deepest = depth
            size = 8
            if kind is dict:
                for key, val in item.items():  # type: ignore[attr-defined]
                    size += self._size(key, depth) + self._size(val, depth)
            else:
                for val in item:  # type: ignore[attr-defined]
                    size += self._size(val, depth)
            return size
        if kind is Call:
            nested = depth + self._depth.get(item, 1)  # type: ignore[call-overload]
            if nested > MAX_NESTING:
                raise _TooDeep
            if nested > self._deepest:
                self._deepest = nested
            return 16
        if kind is int:
            return 8 + int(item.bit_length()) // 8  # type: ignore[attr-defined]
        return 8
