"""The evaluation worker process: `python -m starmesh.compiler._worker`.

Reads a pickled `WorkerRequest` from stdin, limits its own address space and CPU time,
evaluates the policy and writes a pickled `WorkerResult` to stdout. Anything else that
writes to stdout is redirected to stderr first, so only the result reaches the parent.
"""

from __future__ import annotations

import gc
import os
import pickle
import resource
import sys

from starmesh.compiler._eval_protocol import Limits, WorkerRequest, WorkerResult
from starmesh.compiler._eval_run import run
from starmesh.compiler.diagnostics import Finding

__all__ = ["main"]


def _limit_resources(limits: Limits) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    cpu = max(1, int(limits.time_seconds + limits.startup_seconds))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or hard > cpu + 1:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main() -> int:
    result_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    request = pickle.loads(sys.stdin.buffer.read())
    if not isinstance(request, WorkerRequest):
        print("starmesh evaluation worker: bad request", file=sys.stderr)
        return 2
    _limit_resources(request.limits)
    # A short-lived process bounded by RLIMIT_AS: the cyclic collector would only
    # rescan the growing set of recorded calls (see starmesh.bundle.gcpause).
    gc.disable()
    try:
        result = run(request)
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except MemoryError:
        memory = request.limits.describe_memory()
        finding = Finding(
            request.entry, 1, 1, "SM106", "error", f"policy evaluation exceeded the memory limit of {memory}"
        )
        data = pickle.dumps(WorkerResult((), (request.entry,), (finding,)), protocol=pickle.HIGHEST_PROTOCOL)
    result_out.write(data)
    result_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
