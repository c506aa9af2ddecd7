"""Authorization's "why" (`PreparedAllow.trace`, explain's `authorization.why`): the same
decision as `admits` for every allow and request of a grid, and sentences that name
what held or what each allow needed."""

from __future__ import annotations

import itertools

import pytest

from starmesh.bundle.authz import PreparedAuthorization, prepare_authorization
from starmesh.bundle.spec import Allow, Authorization, SourceLocation

ALLOWS = [
    Allow(),
    Allow(sources=("productpage",)),
    Allow(sources=("productpage", "reviews"), methods=("get", "HEAD")),
    Allow(methods=("POST",), paths=("/login", "/api/*")),
    Allow(paths=("*",)),
    Allow(paths=("/exact",)),
    Allow(sources=("reviews",), methods=("GET",), paths=("/ratings/*", "/health")),
]
SOURCES = [None, "productpage", "reviews", "ratings"]
METHODS = ["GET", "HEAD", "POST", "DELETE"]
PATHS = ["/", "/login", "/api/", "/api/x", "/exact", "/exact/", "/ratings/1", "/health", "/healthz"]


def _prepared(*allows: Allow) -> PreparedAuthorization:
    source_map = {f"authorization/s/{i}": SourceLocation(file="a.star", line=10 + i) for i in range(len(allows))}
    return prepare_authorization("s", Authorization(rules=allows), source_map)


def test_trace_decides_as_admits_on_a_grid() -> None:
    authz = _prepared(*ALLOWS)
    checked = 0
    for allow in authz.rules:
        for source, method, path in itertools.product(SOURCES, METHODS, PATHS):
            held, why = allow.trace(source, method, path)
            assert held == allow.admits(source, method, path), (allow, source, method, path, why)
            assert why and ("needs" in why) != held, why
            checked += 1
    assert checked == len(ALLOWS) * len(SOURCES) * len(METHODS) * len(PATHS)


@pytest.mark.parametrize(
    ("allow", "source", "method", "path", "expected"),
    [
        (Allow(), None, "GET", "/", (True, "every request")),
        (Allow(paths=("*",)), None, "GET", "/x", (True, "any path")),
        (Allow(sources=("a", "b", "c")), "b", "GET", "/", (True, "source b")),
        (Allow(sources=("a", "b", "c")), "d", "GET", "/", (False, "needs source a, b or c (the request comes from d)")),
        (Allow(sources=("a",)), None, "GET", "/", (False, "needs source a (the request has no proven source)")),
        (Allow(methods=("get",)), None, "PUT", "/", (False, "needs method GET (the request is PUT)")),
        (Allow(paths=("/x", "/y/*")), None, "GET", "/y/1", (True, "path /y/1 (under /y/*)")),
        (Allow(paths=("/x", "/y/*")), None, "GET", "/x", (True, "path /x")),
        (Allow(paths=("/x", "/y/*")), None, "GET", "/z", (False, "needs path /x or /y/* (the request is for /z)")),
        (
            Allow(sources=("a",), methods=("GET",), paths=("/x",)),
            "b",
            "POST",
            "/x",
            (False, "needs source a (the request comes from b) and needs method GET (the request is POST)"),
        ),
    ],
)
def test_trace_sentences(
    allow: Allow, source: str | None, method: str, path: str, expected: tuple[bool, str]
) -> None:
    [prepared] = _prepared(allow).rules
    assert prepared.trace(source, method, path) == expected
