"""Policy durations: `"250ms"`, `"2s"`, `"1m"`, `"1h"` <-> integer milliseconds.

A duration is a non-negative integer followed by one unit, `ms`, `s`, `m` or `h`, with
nothing else around it (DESIGN.md: "an integer with ms, s, m or h, from 1 ms to 24 h").
Fractions ("1.5s"), compound forms ("1m30s"), spaces and signs are rejected: one way to
write a duration keeps policies easy to read and the bundle bytes stable.

`parse_duration` checks the syntax only; callers check the range, because `"0s"` is
meaningful in a few places (`rollout(bake = "0s")`) while a timeout must be at least 1 ms.
`format_duration` gives back the shortest spelling, so `format(parse(x))` is canonical.
"""

from __future__ import annotations

import re

__all__ = [
    "DURATION_HINT",
    "MAX_DURATION_MS",
    "MIN_DURATION_MS",
    "DurationError",
    "format_duration",
    "parse_duration",
]

MIN_DURATION_MS = 1
MAX_DURATION_MS = 24 * 60 * 60 * 1000
DURATION_HINT = 'durations are an integer with ms, s, m or h, e.g. "250ms", "2s"'

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_LARGEST_FIRST = ("h", "m", "s")
_SYNTAX = re.compile(r"([0-9]+)(ms|s|m|h)")
_MAX_DIGITS = 12
"""More digits than this is far past 24 h in any unit; don't build a huge int from it."""


class DurationError(ValueError):
    """A string that is not a duration, or a duration too large to represent."""


def parse_duration(text: str) -> int:
    """The number of milliseconds `text` spells; raise DurationError when it is malformed.

    The result is not range-checked beyond being at most 10**12 units (compare it with
    MIN_DURATION_MS/MAX_DURATION_MS)."""
    found = _SYNTAX.fullmatch(text)
    if found is None:
        raise DurationError(f"invalid duration {text!r}")
    digits, unit = found.groups()
    if len(digits.lstrip("0")) > _MAX_DIGITS:
        raise DurationError(f"duration {text!r} is too large")
    return int(digits) * _UNIT_MS[unit]


def format_duration(ms: int) -> str:
    """The shortest spelling of `ms` milliseconds: 60000 -> "1m", 1500 -> "1500ms", 0 -> "0s"."""
    if ms < 0:
        raise DurationError(f"durations are never negative, got {ms} ms")
    if ms == 0:
        return "0s"
    for unit in _LARGEST_FIRST:
        size = _UNIT_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
