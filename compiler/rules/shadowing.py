"""Rules that can never match.

Rules are tried in order and the first whose match holds wins (DESIGN.md), so:

SM401: every rule after a catch-all rule is unreachable. A rule is a catch-all when it
has no match, or one of its matches holds for every request: no conditions at all, or
only a path condition that every path satisfies (path_prefix "/", or a path_regex such
as ".*"), with no methods, headers or query conditions.

SM411: a rule whose every match is covered by a match of an earlier rule (the earlier
match holds for every request the later one does) is unreachable too. Covering is
decided conservatively, condition by condition, so it is only reported when certain:
a prefix covers a longer path only at a "/" boundary or when the prefix ends in "/"
(true whether prefixes are matched by segment or by characters), regexes only when
identical, header/query conditions when equal or when the earlier one is present().

(An http_route without rules is rejected while the Spec is built, SM207.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from starmesh.bundle.spec import Match, Rule, StringMatch
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.rules.context import LintContext, quoted, route_key

__all__ = ["covers", "is_catch_all", "shadowed_by_catch_all", "shadowed_by_earlier_rule"]

_MATCH_ALL_REGEXES = frozenset({".*", "^.*$", "^.*", ".*$", "/.*", "^/.*", "/.*$", "^/.*$"})
_MATCH_ALL_PREFIXES = frozenset({"", "/"})


def _matches_every_path(match: Match) -> bool:
    if match.path_exact is not None:
        return False
    if match.path_prefix is not None and match.path_prefix not in _MATCH_ALL_PREFIXES:
        return False
    return match.path_regex is None or match.path_regex in _MATCH_ALL_REGEXES


def _matches_everything(match: Match) -> bool:
    return _matches_every_path(match) and match.methods is None and not match.headers and not match.query


def is_catch_all(rule: Rule) -> bool:
    """True when the rule matches every request."""
    return not rule.match or any(_matches_everything(m) for m in rule.match)


def _under_prefix(path: str, prefix: str) -> bool:
    """`path` is matched by `prefix` whether prefixes match by character or by segment."""
    if not path.startswith(prefix):
        return False
    return path == prefix or prefix.endswith("/") or path[len(prefix)] == "/"


def _path_covers(earlier: Match, later: Match) -> bool:
    if _matches_every_path(earlier):
        return True
    if earlier.path_exact is not None:
        return later.path_exact == earlier.path_exact
    if earlier.path_prefix is not None:
        if later.path_exact is not None:
            return _under_prefix(later.path_exact, earlier.path_prefix)
        if later.path_prefix is not None:
            return _under_prefix(later.path_prefix, earlier.path_prefix)
        return False
    return earlier.path_regex is not None and later.path_regex == earlier.path_regex


def _conditions_cover(
    earlier: Mapping[str, StringMatch], later: Mapping[str, StringMatch], fold_case: bool
) -> bool:
    def norm(name: str) -> str:
        return name.lower() if fold_case else name

    later_by_name = {norm(name): cond for name, cond in later.items()}
    for name, cond in earlier.items():
        other = later_by_name.get(norm(name))
        if other is None:
            return False
        if cond.kind != "present" and cond != other:
            return False
    return True


def covers(earlier: Match, later: Match) -> bool:
    """True when `earlier` certainly holds for every request `later` holds for."""
    if earlier.methods is not None:
        if later.methods is None or not {m.upper() for m in later.methods} <= {m.upper() for m in earlier.methods}:
            return False
    return (
        _path_covers(earlier, later)
        and _conditions_cover(earlier.headers, later.headers, fold_case=True)
        and _conditions_cover(earlier.query, later.query, fold_case=False)
    )


def _first_catch_all(rules: tuple[Rule, ...]) -> int | None:
    for index, rule in enumerate(rules):
        if is_catch_all(rule):
            return index
    return None


def shadowed_by_catch_all(ctx: LintContext) -> Iterator[Finding]:
    """SM401: rules after the first catch-all rule of an http_route."""
    for service in sorted(ctx.spec.routes):
        rules = ctx.spec.routes[service]
        first = _first_catch_all(rules)
        if first is None:
            continue
        for index in range(first + 1, len(rules)):
            yield ctx.finding(
                "SM401",
                route_key(service, index),
                f"rules[{index}] of http_route {quoted(service)} can never match: "
                f"rules[{first}] before it matches every request",
                f"move this rule above rules[{first}], or give rules[{first}] a narrower match",
            )


def shadowed_by_earlier_rule(ctx: LintContext) -> Iterator[Finding]:
    """SM411: rules (before any catch-all) whose every match an earlier rule covers."""
    for service in sorted(ctx.spec.routes):
        rules = ctx.spec.routes[service]
        first = _first_catch_all(rules)
        stop = len(rules) if first is None else first
        for index in range(1, stop):
            rule = rules[index]
            shadowing: list[int] = []
            for match in rule.match:
                by = next(
                    (i for i in range(index) if any(covers(m, match) for m in rules[i].match)),
                    None,
                )
                if by is None:
                    break
                if by not in shadowing:
                    shadowing.append(by)
            else:
                names = " and ".join(f"rules[{i}]" for i in shadowing)
                verb = "match" if len(shadowing) > 1 else "matches"
                yield ctx.finding(
                    "SM411",
                    route_key(service, index),
                    f"rules[{index}] of http_route {quoted(service)} can never match: "
                    f"{names} before it already {verb} every request it matches",
                    "move this rule above the broader one, or remove it",
                )
