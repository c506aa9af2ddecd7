"""Policy compiler: Starlark policy files -> validated Spec -> canonical Bundle.

    PolicySource --evaluate--> Evaluation --build_spec--> Spec --lint_spec--> findings
                                                           `--> golden requests --> Bundle

`compile_tree` / `compile_commit` run the whole pipeline; the stages are public for
tools that need one of them (the reconciler reads commits, `explain` needs the Spec).
"""

# Names resolve on first use (PEP 562), so importing one submodule (the proxy's
# `starmesh.bundle.spec`, the evaluation worker) does not import the whole package.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
    from starmesh.compiler.build import BuildResult, build_spec
    from starmesh.compiler.codes import CODES, Code
    from starmesh.compiler.compile import CompileResult, compile_commit, compile_source, compile_tree
    from starmesh.compiler.diagnostics import Finding, Severity
    from starmesh.compiler.errors import CompilerError, EvaluationError, SourceError
    from starmesh.compiler.evaluate import Limits, evaluate
    from starmesh.compiler.lint import lint_spec
    from starmesh.compiler.source import PolicySource, library_files, read_commit, read_directory

__all__ = [
    "CODES",
    "BuildResult",
    "Code",
    "CompileResult",
    "CompilerError",
    "EvaluationError",
    "Finding",
    "Limits",
    "PolicySource",
    "Severity",
    "SourceError",
    "build_spec",
    "compile_commit",
    "compile_source",
    "compile_tree",
    "evaluate",
    "library_files",
    "lint_spec",
    "read_commit",
    "read_directory",
]

_WHERE: dict[str, str] = {
    "BuildResult": "starmesh.compiler.build",
    "CODES": "starmesh.compiler.codes",
    "Code": "starmesh.compiler.codes",
    "CompileResult": "starmesh.compiler.compile",
    "CompilerError": "starmesh.compiler.errors",
    "EvaluationError": "starmesh.compiler.errors",
    "Finding": "starmesh.compiler.diagnostics",
    "Limits": "starmesh.compiler.evaluate",
    "PolicySource": "starmesh.compiler.source",
    "Severity": "starmesh.compiler.diagnostics",
    "SourceError": "starmesh.compiler.errors",
    "build_spec": "starmesh.compiler.build",
    "compile_commit": "starmesh.compiler.compile",
    "compile_source": "starmesh.compiler.compile",
    "compile_tree": "starmesh.compiler.compile",
    "evaluate": "starmesh.compiler.evaluate",
    "library_files": "starmesh.compiler.source",
    "lint_spec": "starmesh.compiler.lint",
    "read_commit": "starmesh.compiler.source",
    "read_directory": "starmesh.compiler.source",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
