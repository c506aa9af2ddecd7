"""What the preview tests share: policy texts compiled for real, and the semantic diff of two.

In importlib mode a test module can import neither another test module nor a conftest,
so the helpers come as fixtures:

    h.policy(text)            the text dedented, leading blank lines dropped: what
                              h.compile writes as mesh.star
    h.line_of(text, needle)   the 1-based line of h.policy(text) where `needle` first occurs
    h.compile(text)           h.policy(text) compiled (it must compile); its Spec
    h.compiled(text, name)    `text` as it is, compiled in tmp_path/NAME (a new directory
                              by default); the CompileResult, which has a bundle
    diff(base, head)          both texts compiled with h.compile, then diff_specs: the
                              semantic kinds only (the access kinds are test_access's)
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from starmesh.bundle.spec import Spec
from starmesh.compiler.compile import CompileResult, compile_tree
from starmesh.preview.model import Change
from starmesh.preview.semantic import diff_specs

ACCESS_KINDS = ("authorization.", "access.")
"""The access diff's kinds (preview/access.py, tested on its own in test_access.py)."""


def policy(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first occurrence of `needle` in the policy `text`."""
    found = [n for n, line in enumerate(policy(text).splitlines(), 1) if needle in line]
    assert found, f"{needle!r} not in the policy"
    return found[0]


class _Compiler:
    """Compiles mesh.star texts under one test's tmp_path, each in a directory of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.counter = itertools.count()

    def compiled(self, text: str, name: str | None = None) -> CompileResult:
        directory = self.root / (name or f"policy{next(self.counter)}")
        directory.mkdir(parents=True)
        (directory / "mesh.star").write_text(text, encoding="utf-8")
        result = compile_tree(directory)
        assert result.bundle is not None and result.digest is not None, [str(f) for f in result.findings]
        return result

    def compile(self, text: str) -> Spec:
        bundle = self.compiled(policy(text)).bundle
        assert bundle is not None
        return bundle.spec


@pytest.fixture
def h(tmp_path: Path) -> SimpleNamespace:
    """The helpers above, as one object (see the module docstring)."""
    compiler = _Compiler(tmp_path)
    return SimpleNamespace(policy=policy, line_of=line_of, compile=compiler.compile, compiled=compiler.compiled)


@pytest.fixture
def diff(h: SimpleNamespace) -> Callable[[str, str], list[Change]]:
    """Diff two mesh.star texts (base, head): the semantic kinds only."""

    def run(base: str, head: str) -> list[Change]:
        return [c for c in diff_specs(h.compile(base), h.compile(head)) if not c.kind.startswith(ACCESS_KINDS)]

    return run
