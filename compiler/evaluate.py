"""Evaluating policy Starlark: untrusted code, run in a bounded worker process.

    evaluate(source) ──pickle──► python -m starmesh.compiler._worker
                                   RLIMIT_AS, RLIMIT_CPU, a check_cancelled deadline,
                                   a call-stack limit and caps on what builtins receive
                     ◄──pickle── WorkerResult (declarations or findings)

The worker sees only the file texts in the PolicySource. The parent allows it a little
more wall time than its own deadline, kills it on overrun, turns deaths by signal into
SM106 findings, and reads its answer with an unpickler that builds only result types.
A subprocess (not fork) keeps this safe to call from a threaded asyncio program.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys

from starmesh.compiler._eval_protocol import RESULT_CLASSES, Limits, WorkerRequest, WorkerResult
from starmesh.compiler.calls import Evaluation
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.errors import CompilerError, EvaluationError, SourceError
from starmesh.compiler.source import PolicySource

__all__ = ["Limits", "evaluate"]

_WORKER = [sys.executable, "-P", "-m", "starmesh.compiler._worker"]
_STDERR_TAIL = 2000


class _ResultUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in RESULT_CLASSES:
            raise pickle.UnpicklingError(f"evaluation worker sent a forbidden type {module}.{name}")
        cls = super().find_class(module, name)
        assert isinstance(cls, type)
        return cls


def evaluate(source: PolicySource, limits: Limits | None = None) -> Evaluation:
    """Evaluates `source.entry` (and what it loads) and returns the builtin declarations.

    Raises EvaluationError with findings (SM101-SM106) when the policy fails to evaluate
    or exceeds a bound, SourceError when the entry file is not in the source.
    """
    limits = limits or Limits()
    if source.entry not in source.files:
        raise SourceError(f"entry file {source.entry} is not in the policy tree; pass --entry to choose another")
    request = WorkerRequest(dict(source.files), source.entry, dict(source.library), limits)
    result = _run_worker(request)
    if result.findings:
        raise EvaluationError(list(result.findings))
    return Evaluation(declarations=result.declarations, files=result.files)


def _run_worker(request: WorkerRequest) -> WorkerResult:
    limits = request.limits
    env = dict(os.environ, RUST_BACKTRACE="0")
    proc = subprocess.Popen(
        _WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True
    )
    try:
        out, err = proc.communicate(
            pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL),
            timeout=limits.time_seconds + limits.startup_seconds,
        )
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return _failed(request, _time_finding(request))
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    stderr = err.decode("utf-8", errors="replace")[-_STDERR_TAIL:]
    if proc.returncode == 0:
        try:
            result = _ResultUnpickler(io.BytesIO(out)).load()
        except Exception as exc:
            raise CompilerError(f"policy evaluation worker sent an unreadable result: {exc}") from exc
        if not isinstance(result, WorkerResult):
            raise CompilerError("policy evaluation worker sent an unexpected result")
        return result
    return _failed(request, _death_finding(request, proc.returncode, stderr))


def _failed(request: WorkerRequest, finding: Finding) -> WorkerResult:
    return WorkerResult((), (request.entry,), (finding,))


def _time_finding(request: WorkerRequest) -> Finding:
    return Finding(
        request.entry,
        1,
        1,
        "SM106",
        "error",
        f"policy evaluation exceeded the time limit of {request.limits.time_seconds:g} s",
        "look for a loop that never ends or grows too fast",
    )


def _memory_finding(request: WorkerRequest) -> Finding:
    return Finding(
        request.entry,
        1,
        1,
        "SM106",
        "error",
        f"policy evaluation exceeded the memory limit of {request.limits.describe_memory()}",
        "a value grew too large: look for a list or string multiplied by a huge number, or a runaway loop",
    )


def _death_finding(request: WorkerRequest, returncode: int, stderr: str) -> Finding:
    """An SM106 finding for a worker that died, or CompilerError when it was our own bug."""
    if returncode == -signal.SIGXCPU:
        return _time_finding(request)
    if "overflowed its stack" in stderr:
        return Finding(
            request.entry,
            1,
            1,
            "SM106",
            "error",
            "policy evaluation exceeded the native stack (values or calls nested too deeply)",
            "look for values nested very deeply (lists inside lists built by a loop)",
        )
    if returncode in (-signal.SIGSEGV, -signal.SIGBUS):
        return Finding(
            request.entry,
            1,
            1,
            "SM106",
            "error",
            "policy evaluation crashed the Starlark interpreter (out of native stack or memory)",
            "look for values nested very deeply (lists inside lists built by a loop) or a runaway loop",
        )
    if returncode in (-signal.SIGABRT, -signal.SIGKILL):
        return _memory_finding(request)
    if "MemoryError" in stderr or "memory allocation" in stderr:
        return _memory_finding(request)
    if returncode < 0:
        return Finding(
            request.entry, 1, 1, "SM106", "error", f"policy evaluation was stopped by signal {-returncode}"
        )
    raise CompilerError(f"policy evaluation worker failed (exit status {returncode}): {stderr.strip()[-500:]}")
