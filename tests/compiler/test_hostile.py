"""Hostile policies: each must stop within its bounds with a clear SM10x finding.

No wall-clock assertions: the timeout marker is only a safety net against a hang.
"""

from __future__ import annotations

import signal

import pytest

from starmesh.compiler._eval_protocol import WorkerRequest
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.errors import EvaluationError
from starmesh.compiler.evaluate import Limits, _death_finding, evaluate
from starmesh.compiler.source import PolicySource

pytestmark = pytest.mark.timeout(60)


def failure(source: str, limits: Limits | None = None, files: dict[str, str] | None = None) -> Finding:
    with pytest.raises(EvaluationError) as caught:
        evaluate(PolicySource(files={"mesh.star": source, **(files or {})}), limits)
    (finding,) = caught.value.findings
    assert finding.severity == "error"
    return finding


def test_unbounded_recursion_hits_the_call_depth_limit() -> None:
    finding = failure('mesh(name = "demo")\ndef f():\n    f()\nf()\n')
    assert finding.code == "SM106"
    assert finding.message == "policy evaluation exceeded the call depth limit of 200"
    assert (finding.file, finding.line) == ("mesh.star", 3)


def test_huge_list_hits_the_memory_limit() -> None:
    finding = failure("x = [0] * 2000000000\n")
    assert finding.code == "SM106"
    assert finding.message == "policy evaluation exceeded the memory limit of 1 GiB"


def test_list_larger_than_the_address_space_limit() -> None:
    finding = failure("x = [0] * 200000000\n")  # 1.6 GB of values: dies on RLIMIT_AS
    assert finding.code == "SM106" and "memory limit of 1 GiB" in finding.message


def test_huge_string_hits_the_memory_limit() -> None:
    finding = failure('x = "x" * (1 << 30)\n')
    assert finding.code == "SM106" and "memory limit" in finding.message


def test_string_repeated_two_to_the_31_times_never_allocates_it() -> None:
    # starlark-rust truncates the count to 32 bits, so this is "" rather than 2 GiB:
    # either outcome is safe; a 2 GiB string is not.
    try:
        result = evaluate(PolicySource(files={"mesh.star": 'service(name = "x" * (1 << 31))\n'}))
    except EvaluationError as exc:
        assert [f.code for f in exc.findings] == ["SM106"]
    else:
        assert result.declarations[0].kwargs["name"] == ""


def test_sorting_a_huge_range_hits_the_memory_limit() -> None:
    finding = failure("x = sorted(range(100000000))\n")
    assert finding.code == "SM106" and "memory limit" in finding.message


def test_a_loop_of_10_to_the_12_steps_hits_the_time_limit() -> None:
    source = "for i in range(1000000):\n    for j in range(1000000):\n        pass\n"
    finding = failure(source, Limits(time_seconds=1))
    assert finding.code == "SM106"
    assert finding.message == "policy evaluation exceeded the time limit of 1 s"
    assert (finding.file, finding.line) == ("mesh.star", 2)


def test_a_loop_inside_a_loaded_function_hits_the_time_limit() -> None:
    lib = "def spin():\n    for i in range(1000000):\n        for j in range(1000000):\n            pass\n"
    finding = failure('load("//lib.star", "spin")\nspin()\n', Limits(time_seconds=1), {"lib.star": lib})
    assert finding.code == "SM106" and "time limit" in finding.message


def test_the_parent_kills_a_worker_that_outlives_its_time() -> None:
    # With no allowance for start-up, the parent's wall-clock kill races the worker's
    # own deadline; whichever wins, the answer is the same finding.
    source = "for i in range(1000000):\n    for j in range(1000000):\n        pass\n"
    finding = failure(source, Limits(time_seconds=1, startup_seconds=0))
    assert finding.code == "SM106" and "time limit of 1 s" in finding.message


def test_a_load_cycle_is_reported_not_followed() -> None:
    lib = {"a.star": 'load("//b.star", "B")\nA = 1\n', "b.star": 'load("//a.star", "A")\nB = 1\n'}
    finding = failure('load("//a.star", "A")\n', files=lib)
    assert finding.code == "SM105"
    assert finding.message == "load cycle: mesh.star -> //a.star -> //b.star -> //a.star"


def test_too_many_declarations() -> None:
    finding = failure('for i in range(100000):\n    service(name = "s%d" % i)\n', Limits(max_declarations=1000))
    assert finding.code == "SM106"
    assert finding.message == "the policy declares more than 1000 objects"
    assert (finding.line, finding.col) == (2, 5)


def test_too_long_a_string_in_a_builtin_argument() -> None:
    finding = failure('mesh(name = "demo")\nservice(name = "x" * (1 << 21))\n')
    assert finding.code == "SM106"
    assert "a string of 2097152 characters passed to service()" in finding.message
    assert (finding.line, finding.col) == (2, 1)


def test_too_much_output_in_total() -> None:
    source = 'v = ["v" * 1000] * 100\nfor i in range(1000):\n    service(name = "a", versions = v)\n'
    finding = failure(source, Limits(max_output_bytes=1_000_000))
    assert finding.code == "SM106" and "exceed 1000000 bytes" in finding.message


def test_values_nested_too_deeply() -> None:
    finding = failure("r = None\nfor i in range(1000):\n    r = retries(attempts = r)\n")
    assert finding.code == "SM106" and "nested more than 64 levels" in finding.message
    finding = failure('x = []\nfor i in range(200):\n    x = [x]\nservice(name = "a", versions = x)\n')
    assert finding.code in ("SM103", "SM106")


def test_a_crash_of_the_interpreter_is_contained() -> None:
    # A list nested 100,000 deep overflows starlark-rust's native stack: the worker
    # dies, the parent reports it.
    finding = failure("x = []\nfor i in range(100000):\n    x = [x]\n")
    assert finding.code == "SM106"


def test_no_file_system_or_process_access() -> None:
    for source in ('x = open("/etc/passwd")\n', 'x = load_file("/etc/passwd")\n', "x = exec\n", "x = __import__\n"):
        assert failure(source).code == "SM102", source


@pytest.mark.parametrize(
    ("returncode", "stderr", "words"),
    [
        (-signal.SIGXCPU, "", "time limit of 10 s"),
        (-signal.SIGKILL, "", "memory limit of 1 GiB"),
        (-signal.SIGABRT, "memory allocation of 1600000000 bytes failed", "memory limit of 1 GiB"),
        (-signal.SIGSEGV, "", "crashed the Starlark interpreter"),
        (-signal.SIGABRT, "thread 'main' has overflowed its stack", "native stack"),
        (1, "MemoryError", "memory limit of 1 GiB"),
    ],
)
def test_worker_deaths_become_findings(returncode: int, stderr: str, words: str) -> None:
    request = WorkerRequest({"mesh.star": ""}, "mesh.star", {}, Limits())
    finding = _death_finding(request, returncode, stderr)
    assert finding.code == "SM106" and words in finding.message
    assert (finding.file, finding.line, finding.col) == ("mesh.star", 1, 1)
