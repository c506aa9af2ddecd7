"""How the semantic diff writes values: in the policy's own words, one line at a time.

Two forms of every value:
- `policy_json` turns a spec object into the JSON a change carries as `old`/`new`:
  the policy language's argument names and units (`per_try_timeout: "333ms"`, not
  `per_try_timeout_ms: 333`), unset fields left out;
- the `*_text` functions write it for people: `attempts 2 → 3`, `v1 90% → 50%`,
  `header end-user = "jason"`, `delay 200ms for 50%`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from starmesh.bundle.explain import format_duration
from starmesh.bundle.spec import Fault, Match, Mirror, Percent, StringMatch

__all__ = [
    "ARROW",
    "NONE",
    "describe_matches",
    "duration_text",
    "fault_text",
    "mirror_text",
    "percent_text",
    "policy_json",
    "settings_change_text",
    "settings_text",
    "share_changes_text",
    "shares_text",
    "value_text",
]

ARROW = "→"
NONE = "none"
"""How a setting that is not set reads (`timeout 1s → none`)."""


def percent_text(value: Percent) -> str:
    return f"{value:g}%"


def duration_text(ms: int | None) -> str:
    """`250ms`, `2s`, `0s`; `none` when unset."""
    if ms is None:
        return NONE
    return "0s" if ms == 0 else format_duration(ms) or NONE


# -- JSON in the policy's words ------------------------------------------------------------


def policy_json(value: Any) -> Any:
    """A spec value (struct, tuple of structs, dict, scalar) as JSON in the policy's words:
    durations as strings under the argument's name, unset and empty fields left out."""
    if isinstance(value, msgspec.Struct):
        fields: dict[str, Any] = {}
        for name in value.__struct_fields__:
            field = getattr(value, name)
            if name.endswith("_ms"):
                name, field = name.removesuffix("_ms"), None if field is None else duration_text(field)
            else:
                field = policy_json(field)
            if field is not None and field != {} and field != []:
                fields[name] = field
        return fields
    if isinstance(value, (tuple, list)):
        return [policy_json(v) for v in value]
    if isinstance(value, dict):
        return {k: policy_json(v) for k, v in value.items()}
    return value


# -- matches -------------------------------------------------------------------------------


def _condition_text(what: str, name: str, cond: StringMatch) -> str:
    if cond.kind == "present":
        return f"{what} {name} present"
    if cond.kind == "regex":
        return f'{what} {name} ~ "{cond.value}"'
    return f'{what} {name} = "{cond.value}"'


def _match_text(match: Match) -> str:
    parts: list[str] = []
    if match.path_exact is not None:
        parts.append(f"path {match.path_exact}")
    if match.path_prefix is not None:
        parts.append(f"prefix {match.path_prefix}")
    if match.path_regex is not None:
        parts.append(f'path ~ "{match.path_regex}"')
    if match.methods is not None:
        parts.append("methods " + "/".join(match.methods))
    parts += [_condition_text("header", name, cond) for name, cond in sorted(match.headers.items())]
    parts += [_condition_text("query", name, cond) for name, cond in sorted(match.query.items())]
    return ", ".join(parts) or "all requests"


def describe_matches(matches: Sequence[Match]) -> str:
    """A rule's match for people: `header end-user = "jason"`, `prefix /api/, methods GET`,
    several matches joined with ` or `; `all requests` for a rule without one."""
    if not matches:
        return "all requests"
    return " or ".join(_match_text(m) for m in matches)


# -- traffic -------------------------------------------------------------------------------


def shares_text(shares: Mapping[str, int]) -> str:
    """`v1 90%, v3 10%` (versions at 0% left out)."""
    return ", ".join(f"{v} {percent_text(s)}" for v, s in shares.items() if s) or "nothing"


def share_changes_text(old: Mapping[str, int], new: Mapping[str, int], order: Iterable[str]) -> str:
    """`v1 90% → 50%, v3 10% → 50%`: the versions whose share changed, in `order`
    (then any others by name); a version missing on one side has 0%."""
    versions = list(dict.fromkeys([*order, *sorted({*old, *new})]))
    return ", ".join(
        f"{v} {percent_text(old.get(v, 0))} {ARROW} {percent_text(new.get(v, 0))}"
        for v in versions
        if old.get(v, 0) != new.get(v, 0)
    )


# -- settings --------------------------------------------------------------------------------


def value_text(key: str, value: Any) -> str:
    """One field of a setting: percents with `%`, lists in brackets, strings as written."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)) and (key == "percent" or key.endswith("_percent")):
        return percent_text(value)
    if isinstance(value, list):
        return "[" + ", ".join(value_text(key, v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(k, v)}" for k, v in value.items()) + "}"
    return str(value)


def settings_text(settings: Mapping[str, Any] | None) -> str:
    """Every field: `attempts 2, per_try_timeout 333ms`; `none` when unset."""
    if settings is None:
        return NONE
    return ", ".join(f"{k} {value_text(k, v)}" for k, v in settings.items()) or "defaults"


def settings_change_text(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str:
    """`attempts 2 → 3, per_try_timeout 333ms → none` when both are set (changed fields
    only); `none → attempts 2, ...` or `attempts 2, ... → none` when one side is unset."""
    if old is None or new is None:
        return f"{settings_text(old)} {ARROW} {settings_text(new)}"
    keys = list(dict.fromkeys([*old, *new]))
    return ", ".join(
        f"{k} {value_text(k, old.get(k))} {ARROW} {value_text(k, new.get(k))}" for k in keys if old.get(k) != new.get(k)
    )


def fault_text(fault: Fault | None) -> str:
    """`delay 200ms for 50%, abort 503 for 100%`; `none` when unset."""
    if fault is None:
        return NONE
    parts: list[str] = []
    if fault.delay_ms is not None:
        parts.append(f"delay {duration_text(fault.delay_ms)} for {percent_text(fault.delay_percent)}")
    if fault.abort_status is not None:
        parts.append(f"abort {fault.abort_status} for {percent_text(fault.abort_percent)}")
    return ", ".join(parts) or "no delay or abort"


def mirror_text(mirror: Mirror | None) -> str:
    """`v2 25%`; `none` when unset."""
    return NONE if mirror is None else f"{mirror.version} {percent_text(mirror.percent)}"
