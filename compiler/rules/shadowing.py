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

`unreachable_rules` is the same analysis as data (rule index -> the earlier rules that
make it unreachable), for `starmesh diff` to report rules that become shadowed.

(An http_route without rules is rejected while the Spec is built, SM207.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from starmesh.bundle.spec import Match, Rule, StringMatch
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.rules.context import LintContext, quoted, route_key

__all__ = ["covers", "is_catch_all", "shadowed_by_catch_all", "shadowed_by_earlier_rule", "unreachable_rules"]

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


def _first_catch_all(rules: Sequence[Rule]) -> int | None:
    for index, rule in enumerate(rules):
        if is_catch_all(rule):
            return index
    return None


def _covering_rules(rules: Sequence[Rule], index: int) -> tuple[int, ...] | None:
    """The earlier rules that together cover every match of `rules[index]` (first cover
    of each match, in order of appearance), or None when some match is not covered."""
    shadowing: list[int] = []
    for match in rules[index].match:
        by = next((i for i in range(index) if any(covers(m, match) for m in rules[i].match)), None)
        if by is None:
            return None
        if by not in shadowing:
            shadowing.append(by)
    return tuple(shadowing)


def unreachable_rules(rules: Sequence[Rule]) -> dict[int, tuple[int, ...]]:
    """Every rule of an http_route that can never match: its index -> the earlier rules
    that make it unreachable (the first catch-all, SM401, or the rules covering each of
    its matches, SM411). Reachable rules are left out; the catch-all rule itself too."""
    first = _first_catch_all(rules)
    stop = len(rules) if first is None else first
    found: dict[int, tuple[int, ...]] = {}
    for index in range(1, stop):
        covering = _covering_rules(rules, index)
        if covering is not None:
            found[index] = covering
    if first is not None:
        found.update((index, (first,)) for index in range(first + 1, len(rules)))
    return found


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
            shadowing = _covering_rules(rules, index)
            if shadowing is None:
                continue
            names = " and ".join(f"rules[{i}]" for i in shadowing)
            verb = "match" if len(shadowing) > 1 else "matches"
            yield ctx.finding(
                "SM411",
                route_key(service, index),
                f"rules[{index}] of http_route {quoted(service)} can never match: "
                f"{names} before it already {verb} every request it matches",
                "move this rule above the broader one, or remove it",
            )
