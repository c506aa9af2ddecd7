"""Access differences in people's words: `GET /reviews/*`, `any method, any path`.

A caller's difference on one service is a set of (method, path sample) atoms (see
`access_atoms`). It is told as clauses, each a set of methods on a set of path
regions, read as a union:

    GET /reviews/*                              one method, one prefix region
    any method, any path                        everything
    any method (except GET), any path           the unnamed methods too
    GET any path (except /reviews/*)            every region but the named ones
    GET /reviews/* (except /reviews/admin)      a prefix without a region inside it

Clauses are grouped by method (methods with the same paths share a clause) or by path,
whichever gives fewer clauses. The JSON form of a clause is
`{"methods", "paths", "except_methods", "except_paths"}`, "*" meaning any.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starmesh.preview.access_atoms import PathSample, Samples

__all__ = ["Clause", "clauses_for", "describe"]

Atom = tuple[int, int]
"""(method index, path index) into a `Samples`."""


@dataclass(frozen=True, slots=True)
class Clause:
    """A set of methods on a set of path regions, as text and as JSON lists."""

    text: str
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    except_methods: tuple[str, ...] = ()
    except_paths: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "paths": list(self.paths),
            "except_methods": list(self.except_methods),
            "except_paths": list(self.except_paths),
        }


def _except(text: str, excluded: Iterable[str]) -> str:
    listed = ", ".join(excluded)
    return f"{text} (except {listed})" if listed else text


def _methods(chosen: frozenset[int], samples: Samples) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(text, methods, except_methods) for a set of method indices."""
    if len(chosen) == len(samples.methods):
        return "any method", ("*",), ()
    if samples.other_method in chosen:
        excluded = tuple(m for i, m in enumerate(samples.methods[:-1]) if i not in chosen)
        return _except("any method", excluded), ("*",), excluded
    names = tuple(samples.methods[i] for i in sorted(chosen))
    return ", ".join(names), names, ()


def _covered(sample: PathSample, prefixes: Iterable[str]) -> bool:
    """Whether a region lies inside another listed prefix region."""
    return any(sample.path.startswith(p) and not (sample.kind == "under" and sample.prefix == p) for p in prefixes)


def _labels(chosen: Iterable[PathSample]) -> tuple[str, ...]:
    """The regions' labels, leaving out those inside a listed prefix region."""
    regions = [s for s in chosen if s.kind != "other"]
    prefixes = [s.prefix for s in regions if s.kind == "under"]
    return tuple(dict.fromkeys(s.label for s in regions if not _covered(s, prefixes)))


def _paths(chosen: frozenset[int], samples: Samples) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(text, paths, except_paths) for a set of path indices."""
    every = samples.paths
    rest = [s for i, s in enumerate(every) if i not in chosen]
    if not rest:
        return "any path", ("*",), ()
    if every[-1] not in rest:  # the other paths are in: say which regions are not
        excluded = _labels(rest)
        return _except("any path", excluded), ("*",), excluded
    listed = _labels(every[i] for i in sorted(chosen))
    prefixes = [s.prefix for i, s in enumerate(every) if i in chosen and s.kind == "under" and s.label in listed]
    inside = _labels(s for s in rest if s.kind != "other" and any(s.path.startswith(p) for p in prefixes))
    return _except(", ".join(listed), inside), listed, inside


def _clause(methods: frozenset[int], paths: frozenset[int], samples: Samples) -> Clause:
    m_text, m_json, m_except = _methods(methods, samples)
    p_text, p_json, p_except = _paths(paths, samples)
    separator = ", " if m_text.startswith("any method") else " "
    return Clause(m_text + separator + p_text, m_json, p_json, m_except, p_except)


def _group(atoms: frozenset[Atom], by_method: bool) -> list[tuple[frozenset[int], frozenset[int]]]:
    """(methods, paths) pairs: by_method groups methods having the same paths."""
    outer: dict[int, set[int]] = {}
    for m, p in atoms:
        key, value = (m, p) if by_method else (p, m)
        outer.setdefault(key, set()).add(value)
    groups: dict[frozenset[int], set[int]] = {}
    for key in sorted(outer):
        groups.setdefault(frozenset(outer[key]), set()).add(key)
    pairs = [(frozenset(keys), inner) for inner, keys in groups.items()]
    return pairs if by_method else [(inner, keys) for keys, inner in pairs]


def clauses_for(atoms: frozenset[Atom], samples: Samples) -> tuple[Clause, ...]:
    """The clauses telling a non-empty set of atoms, fewest first by method grouping."""
    by_method = _group(atoms, True)
    by_path = _group(atoms, False)
    chosen = by_method if len(by_method) <= len(by_path) else by_path
    return tuple(_clause(methods, paths, samples) for methods, paths in chosen)


def describe(clauses: tuple[Clause, ...]) -> str:
    """The clauses as one phrase: `GET /reviews/*; POST /reviews/*/edit`."""
    return "; ".join(c.text for c in clauses)
