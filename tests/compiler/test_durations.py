"""Policy durations: parsing "250ms"/"2s"/"1m"/"1h" and the shortest spelling back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starmesh.compiler.durations import (
    MAX_DURATION_MS,
    MIN_DURATION_MS,
    DurationError,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1ms", 1),
        ("250ms", 250),
        ("2s", 2000),
        ("1m", 60_000),
        ("1h", 3_600_000),
        ("24h", MAX_DURATION_MS),
        ("0s", 0),
        ("007s", 7000),
        ("90s", 90_000),
    ],
)
def test_parse_valid(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "text",
    ["", "2", "s", "2 s", " 2s", "2s ", "1.5s", "-1s", "+1s", "1m30s", "2S", "2sec", "1d", "\u0662s", "ms"],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_parse_rejects_absurdly_long_numbers_without_building_them() -> None:
    with pytest.raises(DurationError, match="too large"):
        parse_duration("9" * 5000 + "s")
    # Leading zeros don't count toward the size.
    assert parse_duration("0" * 50 + "1s") == 1000


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (1, "1ms"), (1500, "1500ms"), (2000, "2s"), (60_000, "1m"), (90_000, "90s"),
     (3_600_000, "1h"), (5_400_000, "90m"), (MAX_DURATION_MS, "24h")],
)
def test_format_shortest(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_format_rejects_negative() -> None:
    with pytest.raises(DurationError):
        format_duration(-1)


@given(st.integers(min_value=0, max_value=MAX_DURATION_MS))
def test_format_then_parse_round_trips(ms: int) -> None:
    assert parse_duration(format_duration(ms)) == ms


@given(st.integers(min_value=MIN_DURATION_MS, max_value=MAX_DURATION_MS), st.sampled_from(["ms", "s", "m", "h"]))
def test_format_is_never_longer_than_any_spelling(ms: int, unit: str) -> None:
    size = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[unit]
    shortest = format_duration(ms)
    if ms % size == 0:
        assert len(shortest) <= len(f"{ms // size}{unit}")
    assert parse_duration(shortest) == ms


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_parse_then_format_is_canonical(number: int, unit: str) -> None:
    ms = parse_duration(f"{number}{unit}")
    assert parse_duration(format_duration(ms)) == ms
    assert format_duration(parse_duration(format_duration(ms))) == format_duration(ms)
