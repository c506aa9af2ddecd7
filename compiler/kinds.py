"""Checking one argument value against its kind from compiler/builtins.py.

Kinds are type-level (`int`, `list[name]`, `dict[header,header_value]`, `value:retries`)
with ranges from `Param.bounds`; compiler/values.py checks the text formats. Values
come back normalized: durations as int milliseconds, integral floats as ints, methods
upper-cased, header names lower-cased, lists as tuples, `regex()`, `present()` and
plain strings as `StringMatch`. A nested call of a `value:X` kind is handed to
`convert_nested`, which checks and builds it in turn (its findings carry its own
location). A problem is reported once and the value becomes INVALID.

Ints: bools are not ints; a float with an integral value (`100 / 2`) is taken as the
int. Every int has a range (`Param.bounds`, by default 0..2**31-1), so no absurd
number reaches the bundle.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starmesh.bundle.spec import StringMatch
from starmesh.compiler.builtins import BUILTINS, Param
from starmesh.compiler.calls import Call
from starmesh.compiler.durations import (
    DURATION_HINT,
    MAX_DURATION_MS,
    MIN_DURATION_MS,
    DurationError,
    format_duration,
    parse_duration,
)
from starmesh.compiler.reporter import INVALID, Reporter, describe
from starmesh.compiler.values import (
    ValueProblem,
    check_domain,
    check_endpoint,
    check_field_value,
    check_header_name,
    check_method,
    check_name,
    check_path,
    check_regex,
)

__all__ = ["INT_BOUNDS", "KindChecker", "NestedConverter", "Where"]

NestedConverter = Callable[[Call], Any]
"""Checks and builds a nested call; returns the spec value or INVALID."""

INT_BOUNDS: tuple[int, int] = (0, 2**31 - 1)
_STATUS_BOUNDS = (100, 599)
_MAX_RATE = 1_000_000_000
_WEIGHT_TOTAL = 100

_TEXT_CHECKS: dict[str, tuple[Callable[[str], str], str]] = {
    "name": (check_name, "SM209"),
    "domain": (check_domain, "SM209"),
    "path": (check_path, "SM209"),
    "request_path": (lambda t: check_path(t, query=True), "SM209"),
    "path_pattern": (lambda t: check_path(t, wildcard=True), "SM209"),
    "method": (check_method, "SM209"),
    "header": (check_header_name, "SM209"),
    "field_value": (check_field_value, "SM209"),
    "regex": (check_regex, "SM205"),
}


@dataclass(frozen=True)
class Where:
    """Where a value sits, for messages: the call, a label like `service(versions[0])`,
    and the parameter (for its bounds)."""

    call: Call
    label: str
    param: Param


class KindChecker:
    """Checks values against kinds, reporting what is wrong; see the module docs."""

    def __init__(self, reporter: Reporter, convert_nested: NestedConverter) -> None:
        self._reporter = reporter
        self._convert_nested = convert_nested

    def check(self, kind: str, value: Any, at: Where) -> Any:
        """The normalized value, or INVALID after reporting why it is not of `kind`."""
        if kind.startswith("list["):
            return self._check_list(kind[5:-1], value, at)
        if kind.startswith("dict["):
            key_kind, _, value_kind = kind[5:-1].partition(",")
            return self._check_dict(key_kind, value_kind, value, at)
        if kind.startswith("value:"):
            return self._check_nested(kind[6:], value, at)
        if kind.startswith("enum:"):
            return self._check_enum(kind[5:].split("|"), value, at)
        if kind.startswith("enum_list:"):
            return self._check_enum_list(kind[10:].split("|"), value, at)
        check = _SCALARS.get(kind)
        if check is None:
            raise AssertionError(f"builtins table names an unknown kind {kind!r} for {at.label}")
        return check(self, value, at)

    def _fail(self, at: Where, code: str, message: str, hint: str | None = None) -> Any:
        self._reporter.at_call(at.call, code, f"{at.label}: {message}", hint)
        return INVALID

    def _wrong_type(self, at: Where, expected: str, value: Any, hint: str | None = None) -> Any:
        return self._fail(at, "SM203", f"must be {expected}, got {describe(value)}", hint)

    def _check_list(self, item_kind: str, value: Any, at: Where) -> Any:
        if not isinstance(value, (list, tuple)):
            return self._wrong_type(at, "a list", value)
        items = [
            self.check(item_kind, item, Where(at.call, f"{at.label[:-1]}[{i}])", at.param))
            for i, item in enumerate(value)
        ]
        return INVALID if any(item is INVALID for item in items) else tuple(items)

    def _check_dict(self, key_kind: str, value_kind: str, value: Any, at: Where) -> Any:
        if not isinstance(value, dict):
            return self._wrong_type(at, "a dict", value)
        result: dict[Any, Any] = {}
        written: dict[Any, str] = {}
        ok = True
        for key, item in value.items():
            if not isinstance(key, str):
                self._wrong_type(at, "a dict with string keys", key)
                ok = False
                continue
            inner = Where(at.call, f'{at.label[:-1]}["{key}"])', at.param)
            checked_key = self.check(key_kind, key, inner)
            checked_item = self.check(value_kind, item, inner)
            if checked_key is INVALID or checked_item is INVALID:
                ok = False
                continue
            if checked_key in result:
                self._fail(
                    at,
                    "SM210",
                    f'"{written[checked_key]}" and "{key}" are the same name',
                    "header names are case-insensitive; give each once",
                )
                ok = False
                continue
            result[checked_key] = checked_item
            written[checked_key] = key
        return result if ok else INVALID

    def _check_nested(self, builtin: str, value: Any, at: Where) -> Any:
        if not isinstance(value, Call) or value.builtin != builtin:
            return self._wrong_type(at, f"{builtin}(...)", value, f"e.g. {BUILTINS[builtin].example}")
        return self._convert_nested(value)

    def _check_enum(self, choices: list[str], value: Any, at: Where) -> Any:
        if not isinstance(value, str):
            return self._wrong_type(at, "a string", value)
        if value not in choices:
            shown = describe(value).removeprefix("string ")
            return self._fail(at, "SM208", f"{shown} is not one of {_choices(choices)}", _did_you_mean(value, choices))
        return value

    def _check_enum_list(self, choices: list[str], value: Any, at: Where) -> Any:
        if not isinstance(value, (list, tuple)):
            return self._wrong_type(at, "a list", value)
        items = [
            self._check_enum(choices, item, Where(at.call, f"{at.label[:-1]}[{i}])", at.param))
            for i, item in enumerate(value)
        ]
        return INVALID if any(item is INVALID for item in items) else tuple(items)

    # scalars

    def _string(self, value: Any, at: Where) -> Any:
        return value if isinstance(value, str) else self._wrong_type(at, "a string", value)

    def _text(self, kind: str, value: Any, at: Where) -> Any:
        if not isinstance(value, str):
            return self._wrong_type(at, "a string", value)
        check, code = _TEXT_CHECKS[kind]
        try:
            return check(value)
        except ValueProblem as problem:
            return self._fail(at, code, str(problem), problem.hint)

    def _bool(self, value: Any, at: Where) -> Any:
        return value if isinstance(value, bool) else self._wrong_type(at, "a bool (True or False)", value)

    def _int(self, value: Any, at: Where) -> Any:
        return self._integer(value, at, at.param.bounds or INT_BOUNDS)

    def _status(self, value: Any, at: Where) -> Any:
        return self._integer(value, at, at.param.bounds or _STATUS_BOUNDS, "HTTP statuses are 3-digit numbers")

    def _integer(self, value: Any, at: Where, bounds: tuple[int | float, int | float], hint: str | None = None) -> Any:
        number = _as_int(value)
        if number is None:
            quoted = isinstance(value, str) and value.strip().isdecimal()
            unquote = f"write the number without quotes: {value.strip()}" if quoted else None
            return self._wrong_type(at, "an int", value, unquote)
        return self._in_range(number, at, bounds, hint)

    def _percent(self, value: Any, at: Where) -> Any:
        number = _as_number(value)
        if number is None:
            return self._wrong_type(at, "a number (a percent)", value)
        return self._in_range(number, at, at.param.bounds or (0, 100), "percents are numbers from 0 to 100")

    def _positive(self, value: Any, at: Where) -> Any:
        number = _as_number(value)
        if number is None:
            return self._wrong_type(at, "a number", value)
        if not (0 < number <= _MAX_RATE):
            return self._fail(at, "SM207", f"must be greater than 0 (and at most {_MAX_RATE}), got {describe(value)}")
        return number

    def _in_range(
        self, number: int | float, at: Where, bounds: tuple[int | float, int | float], hint: str | None = None
    ) -> Any:
        low, high = bounds
        if not (low <= number <= high):
            return self._fail(at, "SM207", f"must be from {low} to {high}, got {number}", hint)
        return number

    def _duration(self, value: Any, at: Where, zero: bool = False) -> Any:
        if not isinstance(value, str):
            return self._wrong_type(at, 'a duration string like "2s"', value, DURATION_HINT)
        try:
            ms = parse_duration(value)
        except DurationError:
            return self._fail(at, "SM204", f"invalid duration {describe(value).removeprefix('string ')}", DURATION_HINT)
        low = 0 if zero else MIN_DURATION_MS
        if not (low <= ms <= MAX_DURATION_MS):
            return self._fail(
                at,
                "SM204",
                f"duration {describe(value).removeprefix('string ')} is out of range",
                f"durations are from {format_duration(low)} to {format_duration(MAX_DURATION_MS)}",
            )
        return ms

    def _header_value(self, value: Any, at: Where) -> Any:
        if isinstance(value, str):
            return StringMatch(kind="exact", value=value)
        if isinstance(value, Call) and value.builtin in ("regex", "present"):
            return self._convert_nested(value)
        return self._wrong_type(at, 'a string, regex("...") or present()', value)

    def _weights(self, value: Any, at: Where) -> Any:
        return self._shares(value, at, integers=True)

    def _backends(self, value: Any, at: Where) -> Any:
        if isinstance(value, str):
            name = self._text("name", value, at)
            return INVALID if name is INVALID else {name: _WEIGHT_TOTAL}
        if not isinstance(value, dict):
            return self._wrong_type(at, 'a version name or a dict like {"v1": 90, "v2": 10}', value)
        return self._shares(value, at, integers=False)

    def _shares(self, value: Any, at: Where, integers: bool) -> Any:
        """Version weights: names to numbers 0..100 summing to 100 (SM206)."""
        if not isinstance(value, dict):
            return self._wrong_type(at, 'a dict like {"v1": 90, "v2": 10}', value)
        example = 'e.g. {"v1": 90, "v2": 10}'
        if not value:
            hint = f"give weights summing to 100, {example}, or leave it out"
            return self._fail(at, "SM206", "no backends given", hint)
        result: dict[str, int | float] = {}
        ok = True
        for key, weight in value.items():
            inner = Where(at.call, f'{at.label[:-1]}["{key}"])', at.param)
            if not isinstance(key, str):
                self._wrong_type(at, "a dict with string keys", key)
                ok = False
                continue
            name = self._text("name", key, inner)
            number = _as_int(weight) if integers else _as_number(weight)
            if number is None:
                if _as_number(weight) is not None:
                    self._fail(inner, "SM206", f"weights are integers, got {describe(weight)}", example)
                else:
                    self._wrong_type(inner, "an int" if integers else "a number", weight)
                ok = False
                continue
            if not (0 <= number <= _WEIGHT_TOTAL):
                self._fail(inner, "SM206", f"weight must be from 0 to 100, got {number}", example)
                ok = False
                continue
            if name is INVALID:
                ok = False
                continue
            result[name] = number
        if not ok:
            return INVALID
        total = sum(result.values())
        if not math.isclose(total, _WEIGHT_TOTAL, rel_tol=0, abs_tol=1e-9):
            return self._fail(at, "SM206", f"weights sum to {total}, not 100", example)
        return result

    def _endpoints(self, value: Any, at: Where) -> Any:
        return self._check_dict("name", "list[endpoint]", value, at)

    def _endpoint(self, value: Any, at: Where) -> Any:
        if not isinstance(value, str):
            return self._wrong_type(at, 'an address string like "127.0.0.1:9081"', value)
        try:
            return check_endpoint(value)
        except ValueProblem as problem:
            return self._fail(at, "SM209", str(problem), problem.hint)


def _text_kind(kind: str) -> Callable[[KindChecker, Any, Where], Any]:
    return lambda checker, value, at: checker._text(kind, value, at)


_SCALARS: dict[str, Callable[[KindChecker, Any, Where], Any]] = {
    "string": KindChecker._string,
    "bool": KindChecker._bool,
    "int": KindChecker._int,
    "status": KindChecker._status,
    "percent": KindChecker._percent,
    "positive_number": KindChecker._positive,
    "duration": KindChecker._duration,
    "duration_or_zero": lambda checker, value, at: checker._duration(value, at, zero=True),
    "header_value": KindChecker._header_value,
    "weights": KindChecker._weights,
    "backends": KindChecker._backends,
    "endpoints": KindChecker._endpoints,
    "endpoint": KindChecker._endpoint,
    **{kind: _text_kind(kind) for kind in _TEXT_CHECKS},
}


def _as_number(value: Any) -> int | float | None:
    """An int or finite float (integral floats become ints); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def _as_int(value: Any) -> int | None:
    number = _as_number(value)
    return number if isinstance(number, int) else None


def _choices(choices: list[str]) -> str:
    return ", ".join(f'"{c}"' for c in choices)


def _did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    prefix = f'did you mean "{close[0]}"? ' if close else ""
    return f"{prefix}choose one of {_choices(choices)}"
