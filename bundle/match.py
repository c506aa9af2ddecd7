"""Request matching: prepared `match(...)` conditions and the request they read.

A `Match` from the spec is prepared once into a `PreparedMatch`: a tuple of small
conditions, each with `test` (the decision) and `describe` (a short sentence for
`explain`). The proxy's fast path and the explain trace both call the same `test`,
so they cannot disagree; only the trace calls `describe`.

Semantics (DESIGN.md, "Precise semantics"):
- all conditions of one match must hold (AND); an empty `match()` matches everything;
- paths never include the query string; `path_regex` and `regex()` must match the
  whole value (`re.fullmatch`);
- methods compare upper-cased;
- header names are case-insensitive (the request's names arrive lower-cased), values
  case-sensitive; `present()` holds when the name is present, whatever its value;
- query conditions read the query string parsed with `urllib.parse.parse_qsl`
  (`keep_blank_values=True`, so `?debug` has the value ""); values are compared
  percent-decoded, and when a name repeats the first value counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import parse_qsl

import msgspec

from starmesh.bundle.errors import BundleError
from starmesh.bundle.spec import Match, StringMatch

__all__ = ["Condition", "PreparedMatch", "RequestView", "Test", "any_match", "prepare_match", "split_path"]


def split_path(path: str) -> tuple[str, str | None]:
    """`/a?b=1` -> (`/a`, `b=1`); a path without `?` has no query (None)."""
    if "?" not in path:
        return path, None
    head, _, query = path.partition("?")
    return head, query


class RequestView(msgspec.Struct, gc=False):
    """What conditions read from one request. Built per request, so kept tiny.

    `method` is upper-case, `path` has no query string, `headers` maps lower-case
    names to values. The query string is parsed only if a condition asks for it.
    A msgspec Struct: its C constructor costs half of a Python `__init__` (built on
    every routed request); `gc=False` because it holds no reference cycles.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    query: str | None
    _params: dict[str, str] | None = None

    @property
    def params(self) -> Mapping[str, str]:
        """Query parameters, first value per name."""
        if self._params is None:
            params: dict[str, str] = {}
            if self.query:
                for name, value in parse_qsl(self.query, keep_blank_values=True):
                    params.setdefault(name, value)
            self._params = params
        return self._params


class Condition(Protocol):
    """One prepared condition of a match."""

    def test(self, req: RequestView) -> bool:
        """Whether the condition holds for the request."""

    def describe(self, req: RequestView, held: bool) -> str:
        """A short sentence saying why it held (or did not)."""


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BundleError(f"{where}: invalid regex {_q(pattern)}: {exc}") from exc


class _PathExact:
    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def test(self, req: RequestView) -> bool:
        return req.path == self.value

    def describe(self, req: RequestView, held: bool) -> str:
        return f"path {req.path} {'is' if held else 'is not'} {self.value}"


class _PathPrefix:
    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def test(self, req: RequestView) -> bool:
        return req.path.startswith(self.value)

    def describe(self, req: RequestView, held: bool) -> str:
        return f"path {req.path} {'starts' if held else 'does not start'} with {self.value}"


class _PathRegex:
    __slots__ = ("regex",)

    def __init__(self, regex: re.Pattern[str]) -> None:
        self.regex = regex

    def test(self, req: RequestView) -> bool:
        return self.regex.fullmatch(req.path) is not None

    def describe(self, req: RequestView, held: bool) -> str:
        return f"path {req.path} {'matches' if held else 'does not match'} regex {_q(self.regex.pattern)}"


class _Methods:
    __slots__ = ("methods", "text")

    def __init__(self, methods: tuple[str, ...]) -> None:
        self.methods = frozenset(m.upper() for m in methods)
        self.text = ", ".join(sorted(self.methods))

    def test(self, req: RequestView) -> bool:
        return req.method in self.methods

    def describe(self, req: RequestView, held: bool) -> str:
        return f"method {req.method} {'is' if held else 'is not'} one of {self.text}"


class _Value:
    """A header or query value condition: exact, full-match regex or present."""

    __slots__ = ("kind", "name", "value", "regex", "in_query")

    def __init__(self, name: str, cond: StringMatch, in_query: bool, where: str) -> None:
        self.kind = cond.kind
        self.name = name
        self.in_query = in_query
        self.value = cond.value or ""
        self.regex = _compile(self.value, where) if cond.kind == "regex" else None
        if cond.kind != "present" and cond.value is None:
            raise BundleError(f"{where}: {self._label()} condition {cond.kind} has no value")

    def _get(self, req: RequestView) -> str | None:
        return (req.params if self.in_query else req.headers).get(self.name)

    def test(self, req: RequestView) -> bool:
        actual = (req.params if self.in_query else req.headers).get(self.name)  # _get, inlined
        if actual is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(actual) is not None
        return self.kind == "present" or actual == self.value

    def _label(self) -> str:
        return f"{'query parameter' if self.in_query else 'header'} {self.name}"

    def describe(self, req: RequestView, held: bool) -> str:
        actual = self._get(req)
        label = self._label()
        if self.kind == "present":
            return f"{label} is {'present' if held else 'absent'}"
        wanted = f"regex {_q(self.value)}" if self.kind == "regex" else _q(self.value)
        if actual is None:
            return f"{label} is absent (wants {wanted})"
        if self.kind == "regex":
            return f"{label} {_q(actual)} {'matches' if held else 'does not match'} {wanted}"
        return f"{label} is {_q(actual)}" if held else f"{label} is {_q(actual)}, not {wanted}"


Test = Callable[[RequestView], bool]


def _always(req: RequestView) -> bool:
    return True


def _fast(cond: Condition) -> Test:
    """`cond.test` as one small closure (no method lookup, no branch on the kind)."""
    if isinstance(cond, _PathExact):
        exact = cond.value
        return lambda req: req.path == exact
    if isinstance(cond, _PathPrefix):
        prefix = cond.value
        return lambda req: req.path.startswith(prefix)
    if isinstance(cond, _Methods):
        methods = cond.methods
        return lambda req: req.method in methods
    if isinstance(cond, _Value) and not cond.in_query and cond.regex is None:
        name, value = cond.name, cond.value
        if cond.kind == "present":
            return lambda req: name in req.headers
        return lambda req: req.headers.get(name) == value  # None (absent) never equals a str
    return cond.test


def _all(tests: tuple[Test, ...]) -> Test:
    if not tests:
        return _always
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        first, second = tests
        return lambda req: first(req) and second(req)

    def every(req: RequestView) -> bool:
        for test in tests:
            if not test(req):
                return False
        return True

    return every


class PreparedMatch:
    """One `match(...)`, prepared: every condition must hold.

    `holds` is `test` compiled at prepare time into as few Python calls as the
    conditions allow (what routing calls); `test` and `trace` walk the conditions."""

    __slots__ = ("conditions", "holds")

    def __init__(self, conditions: tuple[Condition, ...]) -> None:
        self.conditions = conditions
        self.holds: Test = _all(tuple(_fast(cond) for cond in conditions))

    def test(self, req: RequestView) -> bool:
        """Whether every condition holds."""
        for cond in self.conditions:
            if not cond.test(req):
                return False
        return True

    def trace(self, req: RequestView) -> tuple[bool, str]:
        """The same decision as `test`, with the reason: the first failing condition,
        or every condition that held."""
        for cond in self.conditions:
            if not cond.test(req):
                return False, cond.describe(req, False)
        if not self.conditions:
            return True, "an empty match() matches every request"
        return True, " and ".join(cond.describe(req, True) for cond in self.conditions)


def prepare_match(match: Match, where: str) -> PreparedMatch:
    """Prepare a spec `Match`; `where` names it in errors (e.g. `route/reviews/2`).

    Raises BundleError for an invalid regex or a value condition without a value."""
    conds: list[Condition] = []
    if match.path_exact is not None:
        conds.append(_PathExact(match.path_exact))
    if match.path_prefix is not None:
        conds.append(_PathPrefix(match.path_prefix))
    if match.path_regex is not None:
        conds.append(_PathRegex(_compile(match.path_regex, where)))
    if match.methods is not None:
        conds.append(_Methods(match.methods))
    for name, cond in sorted(match.headers.items()):
        conds.append(_Value(name.lower(), cond, False, where))
    for name, cond in sorted(match.query.items()):
        conds.append(_Value(name, cond, True, where))
    return PreparedMatch(tuple(conds))


def any_match(matches: tuple[PreparedMatch, ...]) -> Test:
    """Whether any of a rule's matches holds, as one callable (routing's per-rule test)."""
    if len(matches) == 1:
        return matches[0].holds
    tests = tuple(match.holds for match in matches)

    def any_holds(req: RequestView) -> bool:
        for test in tests:
            if test(req):
                return True
        return False

    return any_holds
