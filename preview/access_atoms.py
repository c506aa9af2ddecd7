"""The requests an access comparison decides: callers, methods and sample paths.

An `allow` tells requests apart only by the caller's proven identity, the method and
the path patterns it names, so a handful of requests stands for all of them:

    methods   every method named in either side's allow rules, plus one representative
              of "any other method" (a method neither side names)
    paths     every exact path named; for each prefix pattern "/reviews/*" the prefix
              itself ("/reviews/") and a sample under it ("/reviews/x", chosen so that
              no other pattern tells it apart from the rest of "/reviews/…"); plus one
              representative of "any other path" (under no named pattern)
    callers   a caller's `View` on one side: whether it can connect under the service's
              effective mTLS, and the identity its connection proves

Two callers with the same view decide alike; so do two identities no `sources` list
names, and an unnamed identity decides like no identity at all (an unauthenticated
request matches no `sources` rule, and an unnamed identity matches none either). A
`Verdicts` vector is therefore computed once per distinct (view, named identity).

Each request is decided with the bundle's own `PreparedAuthorization.decide`, so the
answer is the proxy's. Patterns that admit every path ("*", "/*") name no region of
their own: "any other path" stands for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starmesh.bundle.authz import PreparedAuthorization
from starmesh.bundle.spec import Authorization, MtlsMode, Spec

__all__ = [
    "DENIED",
    "OPEN",
    "PathSample",
    "Samples",
    "Verdicts",
    "View",
    "named_sources",
    "samples_for",
    "verdicts",
    "view_of",
]

DENIED = -2
"""A verdict: the request is refused (no connection, or no allow admits it)."""
OPEN = -1
"""A verdict: allowed with no allow rule involved (no authorization, or audit mode)."""

Verdicts = tuple[int, ...]
"""One verdict per (method, path sample), methods outer: DENIED, OPEN, or the index of
the allow rule that admitted the request."""

_OTHER_METHODS = ("PATCH", "DELETE", "PUT", "POST", "GET", "HEAD", "OPTIONS", "TRACE", "CONNECT")
"""Where the representative "any other method" is picked from: the first one not named."""

_MATCH_EVERY_PATH = frozenset({"*", "/*"})
"""Path patterns every request path is under."""

_SAMPLE_CHARS = "xyzqjkw"
"""Characters tried to extend a prefix into a sample path under it."""


@dataclass(frozen=True, slots=True)
class PathSample:
    """A concrete path standing for a region of paths.

    kind "exact": the path itself (a named exact path, or a prefix pattern's prefix);
    "under": every path under `prefix` that no longer pattern names (labelled
    `prefix*`); "other": every path under no named pattern."""

    path: str
    kind: Literal["exact", "under", "other"]
    prefix: str = ""

    @property
    def label(self) -> str:
        """How summaries name the region: "/health", "/reviews/*"; "" for the other paths."""
        if self.kind == "under":
            return self.prefix + "*"
        return self.path if self.kind == "exact" else ""


@dataclass(frozen=True, slots=True)
class Samples:
    """The methods and paths one service's access is compared over.

    `methods` lists the named methods (upper-case, sorted), then the representative
    other method; `paths` lists the samples sorted by path, the other path last."""

    methods: tuple[str, ...]
    paths: tuple[PathSample, ...]

    @property
    def other_method(self) -> int:
        """The index of the representative "any other method"."""
        return len(self.methods) - 1

    @property
    def size(self) -> int:
        return len(self.methods) * len(self.paths)


@dataclass(frozen=True, slots=True)
class View:
    """What a receiving proxy sees of one caller: whether its connection is accepted,
    and the service identity it proves (None: unauthenticated)."""

    connects: bool
    identity: str | None


def view_of(spec: Spec, mode: MtlsMode, caller: str | None) -> View:
    """The view of `caller` (None: an unauthenticated client) by a service whose
    effective mTLS is `mode`, on the side `spec` describes.

    strict accepts only mesh services; permissive accepts services (over mTLS) and
    plaintext clients (no identity); disable accepts everybody and proves nobody. A
    service the side does not declare does not exist there: it cannot call."""
    if caller is None:
        return View(connects=mode != "strict", identity=None)
    if caller not in spec.services:
        return View(connects=False, identity=None)
    return View(connects=True, identity=None if mode == "disable" else caller)


def named_sources(authorization: Authorization | None) -> frozenset[str]:
    """Every service identity some allow's `sources` names."""
    if authorization is None:
        return frozenset()
    return frozenset(s for allow in authorization.rules for s in allow.sources or ())


def _named_patterns(*authorizations: Authorization | None) -> tuple[set[str], set[str]]:
    """(methods upper-case, path patterns) named by the given authorizations' allows."""
    methods: set[str] = set()
    paths: set[str] = set()
    for authz in authorizations:
        for allow in authz.rules if authz is not None else ():
            methods.update(m.upper() for m in allow.methods or ())
            paths.update(allow.paths or ())
    return methods, paths


def _under(prefix: str, named: set[str]) -> str:
    """A path under `prefix` that no named pattern tells apart from the rest of it:
    no exact path equals it and no longer prefix covers it."""
    suffixes: list[str] = [*_SAMPLE_CHARS, *(f"x{i}" for i in range(len(named) + 1))]
    for suffix in suffixes:
        candidate = prefix + suffix
        if not any(s.startswith(candidate) for s in named):
            return candidate
    raise AssertionError("unreachable: finitely many names cannot cover every suffix")


def samples_for(old: Authorization | None, new: Authorization | None) -> Samples:
    """The methods and sample paths that cover every distinction either side draws."""
    methods, patterns = _named_patterns(old, new)
    other_method = next((m for m in _OTHER_METHODS if m not in methods), None)
    if other_method is None:
        other_method = next(f"OTHER{i}" for i in range(len(methods) + 1) if f"OTHER{i}" not in methods)

    patterns -= _MATCH_EVERY_PATH
    prefixes = {p[:-1] for p in patterns if p.endswith("*")}
    named = {p[:-1] if p.endswith("*") else p for p in patterns}
    by_path: dict[str, PathSample] = {}
    for path in sorted(named):
        by_path.setdefault(path, PathSample(path, "exact"))
    for prefix in sorted(prefixes):
        sample = _under(prefix, named)
        by_path[sample] = PathSample(sample, "under", prefix)
    other = _under("/", named)
    paths = (*sorted(by_path.values(), key=lambda s: s.path), PathSample(other, "other"))
    return Samples(methods=(*sorted(methods), other_method), paths=paths)


def verdicts(authz: PreparedAuthorization | None, view: View, samples: Samples) -> Verdicts:
    """The verdict of every (method, path) for a caller with `view`: what the receiving
    proxy would do (a refused connection denies everything; audit admits everything)."""
    if not view.connects:
        return (DENIED,) * samples.size
    if authz is None:
        return (OPEN,) * samples.size
    out: list[int] = []
    for method in samples.methods:
        for sample in samples.paths:
            decision = authz.decide(view.identity, method, sample.path)
            if decision.rule_index is not None:
                out.append(decision.rule_index)
            else:
                out.append(OPEN if decision.allowed else DENIED)
    return tuple(out)
