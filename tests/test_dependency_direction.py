"""The dependency direction in DESIGN.md, enforced by reading every module's imports.

    bundle      the shared contract: imports no stage, no Starlark, no Git
    compiler    imports bundle
    runtime     imports bundle only (a proxy never needs Starlark or Git)
    reconciler  imports compiler and bundle
    preview     imports compiler and bundle (starmesh diff's semantic comparison)
    cli         imports everything

Imports are read with `ast`, so lazy imports inside functions, `if TYPE_CHECKING:`
blocks and `importlib.import_module("...")` with a literal name all count. Bare
`import compiler` (the folder name instead of `starmesh.compiler`) is always an error:
it would load a second copy of every class.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("bundle", "compiler", "runtime", "reconciler", "preview", "cli", "policies")
"""Top-level folders that install as `starmesh.<folder>`."""

ALLOWED: dict[str, frozenset[str]] = {
    "bundle": frozenset({"bundle"}),
    "compiler": frozenset({"compiler", "bundle", "policies"}),
    "runtime": frozenset({"runtime", "bundle"}),
    "reconciler": frozenset({"reconciler", "compiler", "bundle", "policies"}),
    "preview": frozenset({"preview", "compiler", "bundle", "policies"}),
    "cli": frozenset(PACKAGES),
    "policies": frozenset({"policies"}),
}
"""Which starmesh packages each package may import."""

FORBIDDEN_THIRD_PARTY: dict[str, frozenset[str]] = {
    "bundle": frozenset({"starlark", "git"}),
    "runtime": frozenset({"starlark", "git"}),
}
"""Third-party top-level modules a package must not import."""


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.imported}: {self.why}"


def imported_modules(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in a module of `starmesh.<package>`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative imports stay inside the package's own namespace.
                base = f"starmesh.{package}"
                yield node.lineno, f"{base}.{node.module}" if node.module else base
            elif node.module:
                yield node.lineno, node.module
                if node.module == "starmesh":  # from starmesh import compiler
                    for alias in node.names:
                        yield node.lineno, f"starmesh.{alias.name}"
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            if node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    yield node.lineno, node.args[0].value


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def check_package(root: Path, package: str) -> list[Violation]:
    """Every import in `root/<package>` that breaks the dependency direction."""
    violations = []
    for path in sorted((root / package).rglob("*.py")):
        relative = str(path.relative_to(root))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        for line, module in imported_modules(tree, package):
            why = _judge(package, module)
            if why:
                violations.append(Violation(relative, line, module, why))
    return violations


def _judge(package: str, module: str) -> str | None:
    parts = module.split(".")
    top = parts[0]
    if top in PACKAGES:
        return f"import it as starmesh.{module} (the bare folder name loads a second copy)"
    if top == "starmesh":
        if len(parts) < 2:
            return None
        target = parts[1]
        if target not in ALLOWED[package]:
            allowed = ", ".join(sorted(f"starmesh.{name}" for name in ALLOWED[package]))
            return f"starmesh.{package} may import only {allowed} (DESIGN.md: dependency direction)"
        return None
    if top in FORBIDDEN_THIRD_PARTY.get(package, frozenset()):
        return f"starmesh.{package} must not depend on {top} (DESIGN.md: dependency direction)"
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_direction(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package}/ is missing from the repository root"
    violations = check_package(ROOT, package)
    assert not violations, "\n".join(str(violation) for violation in violations)


# --- the checker itself can fail ----------------------------------------------------------


def _tree(tmp_path: Path, package: str, source: str) -> Path:
    (tmp_path / package).mkdir()
    (tmp_path / package / "mod.py").write_text(source, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("bundle", "from starmesh.compiler.calls import Call\n", "starmesh.compiler.calls"),
        ("bundle", "import starlark\n", "starlark"),
        ("bundle", "def f():\n    import git\n", "git"),
        ("bundle", "from starmesh import runtime\n", "starmesh.runtime"),
        ("runtime", "from starmesh.compiler import x\n", "starmesh.compiler"),
        ("runtime", "from starlark import Module\n", "starlark"),
        ("runtime", "import starmesh.reconciler\n", "starmesh.reconciler"),
        ("runtime", "import importlib\nimportlib.import_module('starmesh.cli.main')\n",
         "starmesh.cli.main"),
        ("compiler", "from starmesh.runtime.table import RouteTable\n",
         "starmesh.runtime.table"),
        ("compiler", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
         "    from starmesh.reconciler import loop\n", "starmesh.reconciler"),
        ("reconciler", "from starmesh.runtime import proxy\n", "starmesh.runtime"),
        ("reconciler", "import starmesh.cli\n", "starmesh.cli"),
        ("cli", "from compiler.builtins import BUILTINS\n", "compiler.builtins"),
        ("compiler", "import bundle.spec\n", "bundle.spec"),
    ],
)  # fmt: skip
def test_checker_catches(tmp_path: Path, package: str, source: str, expected: str) -> None:
    [violation] = check_package(_tree(tmp_path, package, source), package)
    assert violation.imported == expected
    assert violation.file == f"{package}/mod.py"


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("bundle", "from starmesh.bundle.spec import Spec\nimport msgspec\n"),
        ("bundle", "from . import spec\nfrom .errors import BundleError\n"),
        ("compiler", "from starmesh.bundle.spec import Spec\nimport starlark\n"),
        ("runtime", "from starmesh.bundle.release import verify_release\nimport aiohttp\n"),
        ("reconciler", "from starmesh.compiler import x\nimport git\n"),
        ("cli", "from starmesh.runtime import a\nfrom starmesh.reconciler import b\n"),
        ("runtime", "import gitdb_like_name\nimport starlarkish\n"),
    ],
)
def test_checker_allows(tmp_path: Path, package: str, source: str) -> None:
    assert check_package(_tree(tmp_path, package, source), package) == []
