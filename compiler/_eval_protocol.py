"""What the parent sends the evaluation worker and what it sends back (pickled).

The parent trusts its own request; it reads the worker's answer with an unpickler that
only builds the classes listed in `RESULT_CLASSES`, so even a worker gone wrong cannot
make the parent run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starmesh.compiler.calls import Call
from starmesh.compiler.diagnostics import Finding

__all__ = ["Limits", "RESULT_CLASSES", "WorkerRequest", "WorkerResult"]


@dataclass(frozen=True)
class Limits:
    """Bounds on one policy evaluation (DESIGN.md: bounded in time and memory)."""

    time_seconds: float = 10.0
    """Starlark evaluation time, checked as it runs; the parent kills the worker a little later."""
    memory_bytes: int = 1 << 30
    """The worker's address-space limit (RLIMIT_AS)."""
    call_depth: int = 200
    """Starlark call-stack frames (the builtin wrappers and library macros count too)."""
    max_declarations: int = 100_000
    """Calls of declaring builtins (mesh, service, http_route, authorization, request_test)."""
    max_output_bytes: int = 64 << 20
    """Approximate size of everything passed to builtins, summed over the evaluation."""
    max_string_chars: int = 1 << 20
    """Longest string accepted in a builtin argument."""
    startup_seconds: float = 20.0
    """Extra wall time the parent allows for starting the worker and returning its result."""

    def describe_memory(self) -> str:
        size = self.memory_bytes
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if size >= scale and size % scale == 0:
                return f"{size // scale} {unit}"
        return f"{size} bytes"


@dataclass(frozen=True)
class WorkerRequest:
    """Everything evaluation may see: file texts by root-relative key, never paths."""

    files: Mapping[str, str]
    entry: str
    library: Mapping[str, str]
    limits: Limits


@dataclass(frozen=True)
class WorkerResult:
    """The declarations and loaded files, or the findings that stopped evaluation."""

    declarations: tuple[Call, ...]
    files: tuple[str, ...]
    findings: tuple[Finding, ...]


RESULT_CLASSES: frozenset[tuple[str, str]] = frozenset(
    {
        ("starmesh.compiler._eval_protocol", "WorkerResult"),
        ("starmesh.compiler.calls", "Call"),
        ("starmesh.compiler.diagnostics", "Finding"),
        ("starmesh.bundle.spec", "SourceLocation"),
    }
)
