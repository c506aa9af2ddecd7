"""Routing changes of one service: its rules paired by key, then compared one by one.

Routing rules have no names, so a rule's key is its `match` (canonical JSON; the n-th
rule with the same match gets (match, n)). Rules paired by key may have moved or
changed their settings; unpaired rules at the same index pair as "match changed"; the
rest are added or removed. A service without `http_route` has one implicit catch-all
rule (all requests, all endpoints), so its first route pairs with it and "all
endpoints → v1 100%" reads as a traffic shift (docs/design/issue6-interfaces.md).

For each pair: the match (index pairs), the effective traffic shares, the rule's own
timeout and retries, fault, mirror, request headers, and whether lint's shadowing
analysis (`unreachable_rules`, SM401/SM411) finds it unreachable on each side.
Changes come in head rule order; a removed rule comes after the head rule that its
nearest paired predecessor became.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from starmesh.bundle.routes import PreparedService
from starmesh.bundle.spec import Rule, SourceLocation, Spec
from starmesh.compiler.rules.shadowing import unreachable_rules
from starmesh.preview.model import CHANGES_PRECEDENCE, REMOVES_ROUTE, UNREACHABLE_RULE, Change, shifts_traffic
from starmesh.preview.semantic_settings import (
    SettingChange,
    as_change,
    fault_change,
    headers_change,
    mirror_change,
    retries_change,
    timeout_change,
)
from starmesh.preview.semantic_text import (
    ARROW,
    describe_matches,
    policy_json,
    share_changes_text,
    shares_text,
)

__all__ = ["RulePairing", "pair_rules", "route_changes"]


@dataclass(frozen=True, slots=True)
class RulePairing:
    """How two rule lists pair: (old index, new index) by key and by index (the match
    changed), and the indices left over on each side."""

    by_key: tuple[tuple[int, int], ...]
    by_index: tuple[tuple[int, int], ...]
    removed: tuple[int, ...]
    added: tuple[int, ...]

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Every pair, in base order."""
        return tuple(sorted(self.by_key + self.by_index))


def _keys(rules: Sequence[Rule]) -> list[tuple[bytes, int]]:
    seen: Counter[bytes] = Counter()
    keys: list[tuple[bytes, int]] = []
    for rule in rules:
        match = msgspec.json.encode(rule.match, order="sorted")
        keys.append((match, seen[match]))
        seen[match] += 1
    return keys


def pair_rules(old: Sequence[Rule], new: Sequence[Rule]) -> RulePairing:
    """Pair rules by key (their match, and which duplicate of it), then the unpaired at
    the same index."""
    old_index = {key: i for i, key in enumerate(_keys(old))}
    by_key = [(old_index[key], j) for j, key in enumerate(_keys(new)) if key in old_index]
    old_left = set(range(len(old))) - {i for i, _ in by_key}
    new_left = set(range(len(new))) - {j for _, j in by_key}
    by_index = sorted((i, i) for i in old_left & new_left)
    return RulePairing(
        by_key=tuple(sorted(by_key)),
        by_index=tuple(by_index),
        removed=tuple(sorted(old_left - new_left)),
        added=tuple(sorted(new_left - old_left)),
    )


@dataclass(frozen=True)
class _Side:
    """One side's routing of a service, as the diff reads it."""

    name: str
    service: PreparedService
    rules: tuple[Rule, ...]
    """The declared rules, or the implicit catch-all `Rule()` without an http_route."""
    unreachable: dict[int, tuple[int, ...]]
    http_route: SourceLocation | None

    @classmethod
    def of(cls, spec: Spec, service: PreparedService) -> _Side:
        declared = spec.routes.get(service.name)
        if declared is None:
            return cls(service.name, service, (Rule(),), {}, service.location)
        where = spec.source_map.get(f"http_route/{service.name}", service.location)
        return cls(service.name, service, declared, unreachable_rules(declared), where)

    def location(self, i: int) -> SourceLocation | None:
        rule = self.service.rules[i]
        return self.service.location if rule.index is None else rule.location

    def rule(self, i: int) -> str:
        """`rules[1] (header end-user = "jason")`."""
        return f"rules[{i}] ({describe_matches(self.rules[i].match)})"

    def named(self, i: int) -> str:
        """The rule with its service: `reviews rules[1] (...)`; the service alone for
        the implicit rule."""
        return self.name if not self.service.has_routes else f"{self.name} {self.rule(i)}"

    def subject(self, i: int) -> str:
        """How a setting's change names the rule: by index and match when the service
        has several rules, else by the service alone."""
        return self.named(i) if len(self.rules) > 1 else self.name

    def traffic(self, i: int) -> str:
        shares = shares_text(self.service.rules[i].shares)
        return f"all endpoints ({shares})" if self.rules[i].backends is None else shares

    def shadowing(self, i: int) -> list[int]:
        return list(self.unreachable.get(i, ()))


def _traffic(old: _Side, i: int, new: _Side, j: int) -> SettingChange | None:
    """Effective shares: declared weights, or the equal split over declared versions."""
    before = {v: s for v, s in old.service.rules[i].shares.items() if s}
    after = {v: s for v, s in new.service.rules[j].shares.items() if s}
    if before == after:
        return None
    shifted = sum(max(0, after.get(v, 0) - before.get(v, 0)) for v in after)
    old_all, new_all = old.rules[i].backends is None, new.rules[j].backends is None
    if old_all != new_all:
        what = f"{old.traffic(i)} {ARROW} {new.traffic(j)}"
    else:
        order = (*new.service.versions, *old.service.versions)
        what = ("all endpoints: " if new_all else "") + share_changes_text(before, after, order)
    return SettingChange(
        what, dict(old.service.rules[i].shares), dict(new.service.rules[j].shares), (shifts_traffic(shifted),)
    )


def _shadowing(old: _Side, i: int | None, new: _Side, j: int) -> tuple[str, SettingChange] | None:
    was = [] if i is None else old.shadowing(i)
    now = new.shadowing(j)
    if bool(was) == bool(now):
        return None
    if now:
        by = " and ".join(new.rule(k) for k in now)
        verb = "match" if len(now) > 1 else "matches"
        what = f"can never match now: {by} before it already {verb} every request it does"
        return "route.shadowed", SettingChange(what, was, now, (UNREACHABLE_RULE,))
    return "route.unshadowed", SettingChange("can match again: no earlier rule covers it now", was, now)


def _pair_changes(old: _Side, i: int, new: _Side, j: int, match_changed: bool) -> list[tuple[str, str, SettingChange]]:
    """(kind, subject, change) for one pair of rules, in report order."""
    a, b = old.rules[i], new.rules[j]
    found: list[tuple[str, str, SettingChange]] = []
    if match_changed:
        what = f"match ({describe_matches(a.match)}) {ARROW} ({describe_matches(b.match)})"
        change = SettingChange(what, policy_json(a.match), policy_json(b.match), (CHANGES_PRECEDENCE,))
        found.append(("route.match", new.named(j), change))
    settings = {
        "traffic.shift": _traffic(old, i, new, j),
        "route.timeout": timeout_change(a.timeout_ms, b.timeout_ms),
        "route.retries": retries_change(a.retries, b.retries),
        "route.fault": fault_change(a.fault, b.fault),
        "route.mirror": mirror_change(a.mirror, b.mirror),
        "route.headers": headers_change(
            a.set_request_headers, a.remove_request_headers, b.set_request_headers, b.remove_request_headers
        ),
    }
    found += [(kind, new.subject(j), change) for kind, change in settings.items() if change is not None]
    shadowing = _shadowing(old, i, new, j)
    if shadowing is not None:
        found.append((shadowing[0], new.named(j), shadowing[1]))
    return found


def _added_changes(old: _Side, new: _Side, j: int) -> list[tuple[str, str, SettingChange]]:
    """An added rule, and what it brings that carries a risk: its fault, its mirror,
    and being unreachable from the start."""
    b = new.rules[j]
    found = [("route.added", new.named(j), SettingChange(f"new rule {ARROW} {new.traffic(j)}", None, policy_json(b)))]
    for kind, change in (("route.fault", fault_change(None, b.fault)), ("route.mirror", mirror_change(None, b.mirror))):
        if change is not None:
            found.append((kind, new.named(j), change))
    shadowing = _shadowing(old, None, new, j)
    if shadowing is not None:
        found.append((shadowing[0], new.named(j), shadowing[1]))
    return found


def _reorder(old: _Side, new: _Side, pairs: Sequence[tuple[int, int]]) -> Change | None:
    """One change when paired rules changed their relative order."""
    in_new_order = sorted(pairs, key=lambda pair: pair[1])
    if [i for i, _ in in_new_order] == [i for i, _ in pairs]:
        return None
    before = [describe_matches(old.rules[i].match) for i, _ in pairs]
    after = [describe_matches(new.rules[j].match) for _, j in in_new_order]

    def listed(descriptions: list[str]) -> str:
        return ", ".join(f"({d})" for d in descriptions)

    what = f"rules reordered: {listed(before)} {ARROW} {listed(after)}"
    reordered = SettingChange(what, before, after, (CHANGES_PRECEDENCE,))
    return as_change(new.name, "route.reordered", new.name, reordered, new.http_route)


def route_changes(
    old_spec: Spec, old_service: PreparedService, new_spec: Spec, new_service: PreparedService
) -> list[Change]:
    """The routing changes of a service declared on both sides, in head rule order."""
    old, new = _Side.of(old_spec, old_service), _Side.of(new_spec, new_service)
    pairing = pair_rules(old.rules, new.rules)
    name = new.name
    positioned: list[tuple[tuple[int, int, int], Change]] = []
    reorder = _reorder(old, new, pairing.pairs)
    if reorder is not None:
        positioned.append(((-1, 0, 0), reorder))
    by_index = set(pairing.by_index)
    for i, j in pairing.pairs:
        for kind, subject, change in _pair_changes(old, i, new, j, (i, j) in by_index):
            positioned.append(((j, 0, 0), as_change(name, kind, subject, change, new.location(j))))
    for j in pairing.added:
        for kind, subject, change in _added_changes(old, new, j):
            positioned.append(((j, 0, 0), as_change(name, kind, subject, change, new.location(j))))
    head_of = dict(pairing.pairs)
    for i in pairing.removed:
        before = max((k for k in head_of if k < i), default=None)
        after = -1 if before is None else head_of[before]
        what = f"rule removed (it sent {old.traffic(i)})"
        removed = SettingChange(what, policy_json(old.rules[i]), None, (REMOVES_ROUTE,))
        positioned.append(((after, 1, i), as_change(name, "route.removed", old.named(i), removed, old.location(i))))
    positioned.sort(key=lambda item: item[0])
    return [change for _, change in positioned]
