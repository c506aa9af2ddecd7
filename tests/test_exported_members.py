"""Each package's curated surface (`__all__`) resolves, and stays lazy."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "package", ["starmesh.bundle", "starmesh.compiler", "starmesh.reconciler", "starmesh.runtime", "starmesh.runtime.http"]
)
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert exported, f"{package} exports nothing"
    assert len(set(exported)) == len(exported), f"{package}.__all__ repeats a name"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names what it does not define: {missing}"
    assert set(exported) <= set(dir(module))
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")


def test_importing_the_spec_does_not_import_the_rest() -> None:
    """The proxy imports starmesh.bundle.spec; it must not pay for DSSE or the compiler."""
    code = (
        "import sys, starmesh.bundle.spec, starmesh.compiler.calls\n"
        "heavy = [m for m in ('starmesh.bundle.dsse', 'cryptography', 'starmesh.compiler.build', 'git')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
