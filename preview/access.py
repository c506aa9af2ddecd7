"""Authorization changes as edges caller -> service gained or lost.

For every service declared on both sides (an added or removed service is reported by
`semantic` as such):

    authorization.added     the service had none and now denies what no allow admits
    authorization.removed   every caller that can connect is allowed everything now
    authorization.mode      enforce <-> audit
    access.gained/.lost     `ratings → reviews GET /reviews/* now allowed`: what each
                            caller can newly do, or can no longer do

A caller is every service the head declares (one only the base declares is gone: its
removal is the change, and a new one counts only where an allow admits it), plus
unauthenticated clients. What
a caller may do is decided by the receiving proxy's own code over the methods and
paths either side names (`access_atoms`): first its connection, under the service's
effective mTLS (strict: services only; permissive: services and plaintext clients;
disable: everybody, and nobody's identity is proven), then `PreparedAuthorization.decide`.
Audit mode allows. So an mTLS change, an authorization added, removed, switched to audit
or with rules edited all show as the edges they change, and a rewrite that decides
every request alike shows nothing.

Edges say who: one caller, `any service` when every service gained or lost alike (or
`any service (except productpage)` when all but a few did), or `unauthenticated` (JSON
source null; "*" for any service, with `except_sources`). They point at the allow rule
that admits the access (the head's for gained, the base's for lost), or where no allow
is involved at the authorization itself, or at the mTLS setting when the caller's
connection changed. A service comparing more than `MAX_COMBINATIONS` requests gets one
`authorization.rules` change instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from starmesh.bundle.authz import PreparedAuthorization, prepare_authorization
from starmesh.bundle.spec import MtlsMode, Spec
from starmesh.preview.access_atoms import (
    DENIED,
    OPEN,
    Samples,
    Verdicts,
    View,
    named_sources,
    samples_for,
    verdicts,
    view_of,
)
from starmesh.preview.access_text import clauses_for, describe
from starmesh.preview.model import NARROWS_ACCESS, REMOVES_PROTECTION, WIDENS_ACCESS, Change
from starmesh.preview.semantic_text import policy_json

__all__ = ["MAX_COMBINATIONS", "diff_access"]

MAX_COMBINATIONS = 200_000
"""Requests (distinct callers × methods × paths) one service's comparison may decide."""

Where = tuple[str, int] | None
"""A policy location (file, line), or None when the source map lacks it."""

_GAINED, _LOST = "access.gained", "access.lost"

_MAX_EXCEPT = 5
"""How many services `any service (except ...)` may leave out; beyond, each caller is
reported on its own."""


def diff_access(old: Spec, new: Spec) -> list[Change]:
    """Authorization and access changes of every service declared on both sides, sorted
    by service, authorization changes before access edges, then by caller."""
    callers = _Callers(frozenset(old.services), frozenset(new.services))
    changes: list[Change] = []
    for name in sorted(callers.both):
        changes.extend(_authorization_changes(name, old, new))
        if _may_differ(name, old, new, callers):
            changes.extend(_ServiceAccess(name, old, new, callers).changes())
    return changes


@dataclass(frozen=True, slots=True)
class _Callers:
    """The services that can call on each side: the head's are the callers compared (a
    service only the base declares is gone, and its removal is the change)."""

    base: frozenset[str]
    head: frozenset[str]

    @property
    def both(self) -> frozenset[str]:
        return self.base & self.head

    @property
    def new(self) -> frozenset[str]:
        return self.head - self.base


def _may_differ(name: str, old: Spec, new: Spec, callers: _Callers) -> bool:
    """False when no caller's access to `name` can differ (the common case): the same
    authorization and mTLS mode, and no new caller an allow could admit."""
    before, after = old.authorization.get(name), new.authorization.get(name)
    if before != after or _mode(old, name) != _mode(new, name):
        return True
    return after is not None and bool(callers.new)


def _mode(spec: Spec, name: str) -> MtlsMode:
    """A service's effective mTLS: its own, else the mesh's."""
    mode = spec.services[name].mtls
    return mode if mode is not None else spec.mesh.mtls


def _where(spec: Spec, key: str) -> Where:
    location = spec.source_map.get(key)
    return None if location is None else (location.file, location.line)


def _change(
    service: str, kind: str, summary: str, old: object, new: object, risk: tuple[str, ...], at: Where
) -> Change:
    file, line = at if at is not None else (None, None)
    return Change(service, kind, summary, old, new, risk, file, line)


def _authorization_changes(name: str, old: Spec, new: Spec) -> Iterator[Change]:
    before, after = old.authorization.get(name), new.authorization.get(name)
    key = f"authorization/{name}"
    risk: tuple[str, ...]
    if before is None and after is not None:
        audit = after.mode == "audit"
        what = "audit mode: logs what it would deny" if audit else "denies what no allow admits"
        risk = () if audit else (NARROWS_ACCESS,)
        count = len(after.rules)
        summary = f"{name}: authorization added ({what}; {count} allow rule{'' if count == 1 else 's'})"
        yield _change(name, "authorization.added", summary, None, policy_json(after), risk, _where(new, key))
    elif before is not None and after is None:
        audit = before.mode == "audit"
        risk = () if audit else (WIDENS_ACCESS, REMOVES_PROTECTION)
        summary = f"{name}: authorization removed: every caller that can connect is allowed every request"
        yield _change(name, "authorization.removed", summary, policy_json(before), None, risk, _where(old, key))
    elif before is not None and after is not None and before.mode != after.mode:
        to_audit = after.mode == "audit"
        what = "denies nothing, logs what it would deny" if to_audit else "denies what no allow admits"
        risk = (WIDENS_ACCESS, REMOVES_PROTECTION) if to_audit else (NARROWS_ACCESS,)
        summary = f"{name}: authorization mode {before.mode} → {after.mode} ({what})"
        yield _change(name, "authorization.mode", summary, before.mode, after.mode, risk, _where(new, key))


class _Side:
    """One side of one service: its prepared authorization, mTLS mode and verdicts by
    caller class (computed on first use)."""

    def __init__(self, spec: Spec, service: str, samples: Samples) -> None:
        self.spec = spec
        authz = spec.authorization.get(service)
        self.authz: PreparedAuthorization | None = (
            None if authz is None else prepare_authorization(service, authz, spec.source_map)
        )
        self.mode = _mode(spec, service)
        self.named = named_sources(authz)
        self.samples = samples
        self._cache: dict[tuple[bool, str | None], Verdicts] = {}

    def view(self, caller: str | None) -> View:
        return view_of(self.spec, self.mode, caller)

    def class_of(self, view: View) -> tuple[bool, str | None]:
        """Callers of one class decide alike: unnamed identities like no identity."""
        return view.connects, view.identity if view.identity in self.named else None

    def verdicts(self, view: View) -> Verdicts:
        key = self.class_of(view)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = verdicts(self.authz, view, self.samples)
        return found


class _ServiceAccess:
    """The access edges of one service declared on both sides."""

    def __init__(self, name: str, old: Spec, new: Spec, callers: _Callers) -> None:
        self.name = name
        self.samples = samples_for(old.authorization.get(name), new.authorization.get(name))
        self.base = _Side(old, name, self.samples)
        self.head = _Side(new, name, self.samples)
        self.old_spec, self.new_spec = old, new
        self.callers = callers

    def changes(self) -> list[Change]:
        groups = self._caller_groups()
        combinations = len(groups) * self.samples.size
        if combinations > MAX_COMBINATIONS:
            return [self._too_many(combinations)]
        edges: dict[tuple[str, frozenset[tuple[int, int]], Where], set[str | None]] = {}
        for representative, members in groups:
            for kind, atoms, at in self._edges(representative):
                edges.setdefault((kind, atoms, at), set()).update(members)
        return sorted(self._render(edges), key=_order)

    def _caller_groups(self) -> list[tuple[str | None, frozenset[str | None]]]:
        """(representative, members): callers deciding alike on both sides. Every service
        some `sources` names stands alone; the others decide like one another, those
        declared on both sides apart from the new ones; unauthenticated clients last."""
        named = self.base.named | self.head.named
        groups: list[tuple[str | None, frozenset[str | None]]] = [
            (caller, frozenset({caller})) for caller in sorted(named & self.callers.head)
        ]
        for plain in (self.callers.both - named, self.callers.new - named):
            if plain:
                groups.append((min(plain), frozenset[str | None](plain)))
        groups.append((None, frozenset({None})))
        return groups

    def _edges(self, caller: str | None) -> Iterator[tuple[str, frozenset[tuple[int, int]], Where]]:
        """(kind, atoms, where) for what this caller gained and what it lost."""
        before_view, after_view = self.base.view(caller), self.head.view(caller)
        before, after = self.base.verdicts(before_view), self.head.verdicts(after_view)
        if before == after:
            return
        is_new = caller is not None and caller not in self.old_spec.services
        # A connection accepted differently, or a different identity proven: mTLS did it.
        by_mtls = not is_new and before_view != after_view
        paths = len(self.samples.paths)
        gained: dict[tuple[int, int], Where] = {}
        lost: dict[tuple[int, int], Where] = {}
        for i, (was, now) in enumerate(zip(before, after, strict=True)):
            atom = divmod(i, paths)
            if was == DENIED and now != DENIED:
                if is_new and now == OPEN:
                    continue  # a new caller is news only where an allow admits it
                gained[atom] = self._mtls_where() if by_mtls else self._gained_where(now)
            elif was != DENIED and now == DENIED:
                lost[atom] = self._mtls_where() if by_mtls else self._lost_where(was)
        for kind, found in ((_GAINED, gained), (_LOST, lost)):
            if found:
                yield kind, frozenset(found), _most_common(found)

    def _gained_where(self, verdict: int) -> Where:
        if verdict >= 0:
            return _where(self.new_spec, f"authorization/{self.name}/{verdict}")
        if self.head.authz is not None:  # audit mode admits it
            return _where(self.new_spec, f"authorization/{self.name}")
        if self.base.authz is not None:  # the authorization was removed
            return _where(self.old_spec, f"authorization/{self.name}")
        return self._mtls_where()

    def _lost_where(self, verdict: int) -> Where:
        if verdict >= 0:
            return _where(self.old_spec, f"authorization/{self.name}/{verdict}")
        if self.head.authz is not None:  # added, or switched to enforce
            return _where(self.new_spec, f"authorization/{self.name}")
        return self._mtls_where()

    def _mtls_where(self) -> Where:
        """The head's mTLS setting: the service's own when it sets or dropped one, else the mesh's."""
        before, after = self.old_spec.services[self.name].mtls, self.new_spec.services[self.name].mtls
        if after is not None or before != after:
            return _where(self.new_spec, f"service/{self.name}")
        return _where(self.new_spec, "mesh")

    def _too_many(self, combinations: int) -> Change:
        key = f"authorization/{self.name}"
        at = _where(self.new_spec, key) or _where(self.old_spec, key) or self._mtls_where()
        summary = (
            f"{self.name}: authorization or mTLS changed; too many combinations to enumerate "
            f"({combinations} caller × method × path): access may be widened or narrowed"
        )
        return _change(self.name, "authorization.rules", summary, None, None, (WIDENS_ACCESS, NARROWS_ACCESS), at)

    def _render(
        self, edges: dict[tuple[str, frozenset[tuple[int, int]], Where], set[str | None]]
    ) -> Iterator[Change]:
        for (kind, atoms, at), members in edges.items():
            named = {m for m in members if m is not None}
            excluded = sorted(self.callers.head - named)
            if len(named) >= 2 and len(excluded) < len(named) and len(excluded) <= _MAX_EXCEPT:
                yield self._edge(kind, atoms, at, "*", excluded)
            else:
                for caller in sorted(named):
                    yield self._edge(kind, atoms, at, caller, [])
            if None in members:
                yield self._edge(kind, atoms, at, None, [])

    def _edge(
        self, kind: str, atoms: frozenset[tuple[int, int]], at: Where, source: str | None, excluded: list[str]
    ) -> Change:
        clauses = clauses_for(atoms, self.samples)
        if source == "*":
            who = "any service" + (f" (except {', '.join(excluded)})" if excluded else "")
        else:
            who = "unauthenticated" if source is None else source
        gained = kind == _GAINED
        summary = f"{who} → {self.name} {describe(clauses)} now {'allowed' if gained else 'denied'}"

        def side(allowed: bool) -> dict[str, object]:
            return {
                "source": source,
                "except_sources": excluded,
                "methods": sorted({m for c in clauses for m in c.methods}),
                "paths": sorted({p for c in clauses for p in c.paths}),
                "allowed": allowed,
                "requests": [c.to_json() for c in clauses],
            }

        risk = (WIDENS_ACCESS,) if gained else (NARROWS_ACCESS,)
        return _change(self.name, kind, summary, side(not gained), side(gained), risk, at)


def _most_common(found: dict[tuple[int, int], Where]) -> Where:
    """The location most atoms point at; the first atom's among equals."""
    counts = Counter(found[atom] for atom in sorted(found))
    return counts.most_common(1)[0][0]


def _order(change: Change) -> tuple[int, str, str]:
    """Named callers by name, then any service, then unauthenticated; gained before lost."""
    source = change.new["source"] if isinstance(change.new, dict) else None
    rank = 2 if source is None else 1 if source == "*" else 0
    return rank, source or "", change.kind
