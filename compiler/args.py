"""Binding a recorded builtin call to its parameters, then checking each argument.

    Call --bind--> raw argument per parameter (defaults filled in)   SM201, SM202
         --check each against its kind (compiler/kinds.py)--> normalized values

Parameters come from compiler/builtins.py. Only parameters marked `positional` may be
passed by position, in order; a parameter whose default is None also accepts None.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from starmesh.compiler.builtins import BUILTINS, Builtin
from starmesh.compiler.calls import Call
from starmesh.compiler.kinds import KindChecker, NestedConverter, Where
from starmesh.compiler.reporter import INVALID, Reporter

__all__ = ["ArgChecker", "Bound"]


@dataclass(frozen=True)
class Bound:
    """One call's arguments by parameter name, defaults filled in.

    `raw` holds them as written (nested `Call`s included, for their locations);
    `values` normalized, with INVALID where a problem was reported. `complete` is
    True when every argument bound and checked, i.e. the call can be built."""

    call: Call
    builtin: Builtin
    raw: dict[str, Any]
    values: dict[str, Any]
    complete: bool

    def valid(self, name: str) -> Any:
        """The checked value of parameter `name`, or None when it is INVALID or absent."""
        value = self.values.get(name)
        return None if value is INVALID else value


class ArgChecker:
    """Binds calls to parameters and checks their arguments, reporting what is wrong."""

    def __init__(self, reporter: Reporter, convert_nested: NestedConverter) -> None:
        self._reporter = reporter
        self._kinds = KindChecker(reporter, convert_nested)

    def check_call(self, call: Call) -> Bound:
        """Bind and check every argument of `call`; problems go to the reporter."""
        builtin = BUILTINS.get(call.builtin)
        if builtin is None:
            # The evaluator only records calls of known builtins; be explicit anyway.
            self._reporter.at_call(call, "SM203", f"{call.builtin}() is not a starmesh builtin")
            return Bound(call, Builtin(call.builtin, (), ""), {}, {}, False)
        raw, complete = self._bind(call, builtin)
        values: dict[str, Any] = {}
        for param in builtin.params:
            if param.name not in raw:
                continue
            value = raw[param.name]
            if value is None and param.default is None:
                values[param.name] = None
                continue
            where = Where(call, f"{builtin.name}({param.name})", param)
            values[param.name] = self._kinds.check(param.kind, value, where)
            complete = complete and values[param.name] is not INVALID
        return Bound(call, builtin, raw, values, complete)

    def _bind(self, call: Call, builtin: Builtin) -> tuple[dict[str, Any], bool]:
        complete = True
        raw: dict[str, Any] = {}
        positional = [p for p in builtin.params if p.positional]
        if len(call.args) > len(positional):
            takes = ", ".join(p.name for p in positional) or "none"
            self._reporter.at_call(
                call,
                "SM202",
                f"{builtin.name}() takes {len(positional)} positional argument(s) ({takes}), got {len(call.args)}",
                f"pass the others by name, e.g. {builtin.example}" if builtin.example else "pass arguments by name",
            )
            complete = False
        for param, value in zip(positional, call.args):
            raw[param.name] = value
        for name, value in call.kwargs.items():
            if builtin.param(name) is None:
                self._unknown_argument(call, builtin, name)
                complete = False
            elif name in raw:
                self._reporter.at_call(
                    call,
                    "SM202",
                    f"{builtin.name}(): argument `{name}` given twice (by position and by name)",
                    "give it once",
                )
                complete = False
            else:
                raw[name] = value
        for param in builtin.params:
            if param.name in raw:
                continue
            if param.required:
                self._reporter.at_call(
                    call,
                    "SM202",
                    f"{builtin.name}(): missing required argument `{param.name}`",
                    f"e.g. {builtin.example}" if builtin.example else None,
                )
                complete = False
            else:
                raw[param.name] = param.default
        return raw, complete

    def _unknown_argument(self, call: Call, builtin: Builtin, name: str) -> None:
        names = [p.name for p in builtin.params]
        close = difflib.get_close_matches(name, names, n=1)
        valid = ", ".join(names) if names else "no arguments"
        hint = f"did you mean `{close[0]}`? " if close else ""
        self._reporter.at_call(
            call,
            "SM201",
            f"{builtin.name}(): unknown argument `{name}`",
            f"{hint}{builtin.name}() takes: {valid}",
        )

    # -- kinds ---------------------------------------------------------------------
