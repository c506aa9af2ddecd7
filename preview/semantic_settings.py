"""One setting compared across two sides, with the risk its change carries.

Services and routing rules share these: a rule's own timeout compares like a
service's, and both are "removed or raised: removes protection". Each function returns
None when the setting behaves the same, else a `SettingChange` (the words after the
subject, the JSON values, the risk labels); the caller knows the subject and where it
was declared, and `as_change` makes the reported `Change` of the two.

What loosens a guard (docs/design/issue6-interfaces.md): a timeout or a retry's
per-try timeout removed or raised; a circuit breaker, outlier detection or rate limit
removed, or any of its limits raised (breaker caps, `consecutive_5xx`,
`max_ejection_percent`, rate-limit `requests_per_second` or `burst`). Faults and
mirrors carry their risk when added or increased; an mTLS mode relaxed relaxes mTLS,
one tightened to strict narrows access.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from starmesh.bundle.spec import (
    CircuitBreaker,
    Fault,
    Mirror,
    OutlierDetection,
    RateLimit,
    Retries,
    SourceLocation,
)
from starmesh.preview.model import (
    ADDS_FAULTS,
    MIRRORS_TRAFFIC,
    NARROWS_ACCESS,
    RELAXES_MTLS,
    REMOVES_PROTECTION,
    Change,
)
from starmesh.preview.semantic_text import (
    ARROW,
    duration_text,
    fault_text,
    mirror_text,
    policy_json,
    settings_change_text,
)

__all__ = [
    "SettingChange",
    "as_change",
    "circuit_breaker_change",
    "fault_change",
    "headers_change",
    "mirror_change",
    "mtls_change",
    "outlier_detection_change",
    "rate_limit_change",
    "retries_change",
    "timeout_change",
]

_S = TypeVar("_S", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class SettingChange:
    """A setting that behaves differently: `what` reads `timeout 1s → none`."""

    what: str
    old: Any
    new: Any
    risk: tuple[str, ...] = ()


def as_change(
    service: str | None, kind: str, subject: str, change: SettingChange, where: SourceLocation | None
) -> Change:
    """The reported `Change`: summary `subject: what` (`reviews rules[1]: timeout 1s →
    none`), pointing at `where` (the declaration it comes from, when the source map has it)."""
    return Change(
        service=service,
        kind=kind,
        summary=f"{subject}: {change.what}",
        old=change.old,
        new=change.new,
        risk=change.risk,
        file=None if where is None else where.file,
        line=None if where is None else where.line,
    )


def _raised(old: float | None, new: float | None) -> bool:
    """A bound went up; None means "no bound", above every number."""
    if old is None:
        return False
    return new is None or new > old


def _guard(old: _S | None, new: _S | None, limits: Sequence[str]) -> tuple[str, ...]:
    """REMOVES_PROTECTION when the guard is removed or one of its `limits` raised."""
    if old is None:
        return ()
    if new is None or any(getattr(new, f) > getattr(old, f) for f in limits):
        return (REMOVES_PROTECTION,)
    return ()


def _struct_change(name: str, old: _S | None, new: _S | None, risk: tuple[str, ...]) -> SettingChange | None:
    if old == new:
        return None
    old_json, new_json = policy_json(old), policy_json(new)
    return SettingChange(f"{name} {settings_change_text(old_json, new_json)}", old_json, new_json, risk)


def timeout_change(old_ms: int | None, new_ms: int | None) -> SettingChange | None:
    """A whole-request timeout: removed or raised removes protection."""
    if old_ms == new_ms:
        return None
    old = None if old_ms is None else duration_text(old_ms)
    new = None if new_ms is None else duration_text(new_ms)
    risk = (REMOVES_PROTECTION,) if _raised(old_ms, new_ms) else ()
    return SettingChange(f"timeout {duration_text(old_ms)} {ARROW} {duration_text(new_ms)}", old, new, risk)


def retries_change(old: Retries | None, new: Retries | None) -> SettingChange | None:
    """Retries: a per-try timeout removed or raised removes protection."""
    old_try = None if old is None else old.per_try_timeout_ms
    new_try = None if new is None else new.per_try_timeout_ms
    return _struct_change("retries", old, new, (REMOVES_PROTECTION,) if _raised(old_try, new_try) else ())


def circuit_breaker_change(old: CircuitBreaker | None, new: CircuitBreaker | None) -> SettingChange | None:
    limits = ("max_connections", "max_pending_requests", "max_requests")
    return _struct_change("circuit_breaker", old, new, _guard(old, new, limits))


def outlier_detection_change(old: OutlierDetection | None, new: OutlierDetection | None) -> SettingChange | None:
    limits = ("consecutive_5xx", "max_ejection_percent")
    return _struct_change("outlier_detection", old, new, _guard(old, new, limits))


def rate_limit_change(old: RateLimit | None, new: RateLimit | None) -> SettingChange | None:
    return _struct_change("rate_limit", old, new, _guard(old, new, ("requests_per_second", "burst")))


def _delay(fault: Fault | None) -> tuple[int, float] | None:
    if fault is None or fault.delay_ms is None or not fault.delay_percent:
        return None
    return fault.delay_ms, fault.delay_percent


def _abort(fault: Fault | None) -> float | None:
    if fault is None or fault.abort_status is None or not fault.abort_percent:
        return None
    return fault.abort_percent


def fault_change(old: Fault | None, new: Fault | None) -> SettingChange | None:
    """Fault injection: a delay that is new, longer or more frequent, or an abort that
    is new or more frequent, adds faults."""
    if old == new:
        return None
    old_delay, new_delay = _delay(old), _delay(new)
    old_abort, new_abort = _abort(old), _abort(new)
    more_delay = new_delay is not None and (
        old_delay is None or new_delay[0] > old_delay[0] or new_delay[1] > old_delay[1]
    )
    more_abort = new_abort is not None and (old_abort is None or new_abort > old_abort)
    risk = (ADDS_FAULTS,) if more_delay or more_abort else ()
    return SettingChange(f"fault {fault_text(old)} {ARROW} {fault_text(new)}", policy_json(old), policy_json(new), risk)


def mirror_change(old: Mirror | None, new: Mirror | None) -> SettingChange | None:
    """Mirroring: added, raised or pointed at another version mirrors traffic (the
    target gets load it did not have)."""
    if old == new:
        return None
    risk: tuple[str, ...] = ()
    if new is not None and (old is None or new.version != old.version or new.percent > old.percent):
        risk = (MIRRORS_TRAFFIC,)
    return SettingChange(
        f"mirror {mirror_text(old)} {ARROW} {mirror_text(new)}", policy_json(old), policy_json(new), risk
    )


def headers_change(
    old_set: Mapping[str, str], old_remove: Sequence[str], new_set: Mapping[str, str], new_remove: Sequence[str]
) -> SettingChange | None:
    """Request headers a rule sets or removes (names compared case-insensitively)."""
    before = {k.lower(): v for k, v in old_set.items()}
    after = {k.lower(): v for k, v in new_set.items()}
    removed_before = {h.lower() for h in old_remove}
    removed_after = {h.lower() for h in new_remove}
    if before == after and removed_before == removed_after:
        return None
    parts: list[str] = []
    for name in sorted({*before, *after}):
        if name not in before:
            parts.append(f'sets {name} = "{after[name]}"')
        elif name not in after:
            parts.append(f"no longer sets {name}")
        elif before[name] != after[name]:
            parts.append(f'sets {name} = "{before[name]}" {ARROW} "{after[name]}"')
    parts += [f"removes {name}" for name in sorted(removed_after - removed_before)]
    parts += [f"no longer removes {name}" for name in sorted(removed_before - removed_after)]

    def as_json(set_headers: Mapping[str, str], remove: Sequence[str]) -> dict[str, Any]:
        return {"set_request_headers": dict(set_headers), "remove_request_headers": list(remove)}

    return SettingChange(
        "request headers: " + ", ".join(parts), as_json(old_set, old_remove), as_json(new_set, new_remove)
    )


_MTLS_STRENGTH = {"disable": 0, "permissive": 1, "strict": 2}
_MTLS_EFFECT = {
    "strict": "plaintext callers refused",
    "permissive": "plaintext callers accepted, without a proven identity",
    "disable": "no mTLS: plaintext only, no caller identity proven",
}


def mtls_change(old: str, new: str) -> SettingChange | None:
    """An mTLS mode (mesh-wide or a service's effective one). Relaxed (strict ->
    permissive -> disable) relaxes mTLS and removes protection; tightened to strict
    narrows access, since plaintext callers are refused from then on."""
    if old == new:
        return None
    risk: tuple[str, ...] = ()
    if _MTLS_STRENGTH[new] < _MTLS_STRENGTH[old]:
        risk = (RELAXES_MTLS, REMOVES_PROTECTION)
    elif new == "strict":
        risk = (NARROWS_ACCESS,)
    effect = _MTLS_EFFECT[new] if new != "permissive" or old == "strict" else "mTLS callers proven again, plaintext too"
    return SettingChange(f"mtls {old} {ARROW} {new} ({effect})", old, new, risk)
