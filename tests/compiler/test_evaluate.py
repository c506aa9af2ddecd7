"""Evaluating policy Starlark: recorded builtin calls, their positions, load(), findings."""

from __future__ import annotations

import pickle
from collections.abc import Mapping

import pytest

from starmesh.bundle.spec import SourceLocation
from starmesh.compiler.calls import Call, Evaluation
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.errors import CompilerError, EvaluationError, SourceError
from starmesh.compiler.evaluate import evaluate
from starmesh.compiler.source import PolicySource

TRAFFIC = """\
def _split(stable, canary, percent):
    return {stable: 100 - percent, canary: percent}

def _route(service, backends):
    return http_route(service, rules = [rule(backends = backends)])

def canary(service, stable, canary, percent):
    return _route(service, _split(stable, canary, percent))
"""

LIBRARY = {"@starmesh//traffic.star": TRAFFIC}


def run(files: Mapping[str, str], entry: str = "mesh.star", library: Mapping[str, str] = LIBRARY) -> Evaluation:
    return evaluate(PolicySource(files=dict(files), entry=entry, library=dict(library)))


def failure(files: Mapping[str, str], entry: str = "mesh.star") -> Finding:
    with pytest.raises(EvaluationError) as caught:
        run(files, entry)
    assert len(caught.value.findings) == 1, caught.value.findings
    return caught.value.findings[0]


def at(call: Call) -> str:
    return str(call.location)


# -- recorded calls ----------------------------------------------------------------------


def test_declarations_are_recorded_in_order_with_positions() -> None:
    result = run(
        {
            "mesh.star": 'mesh(name = "demo")\n'
            "\n"
            'service(name = "web", port = 8080)\n'
            'x = 0;  service("api", versions = ["v1", "v2"])\n'
        }
    )
    assert [c.builtin for c in result.declarations] == ["mesh", "service", "service"]
    mesh, web, api = result.declarations
    assert mesh.kwargs == {"name": "demo"} and mesh.args == ()
    assert at(mesh) == "mesh.star:1:1"
    assert web.kwargs == {"name": "web", "port": 8080}
    assert at(web) == "mesh.star:3:1"
    assert api.args == ("api",) and api.kwargs == {"versions": ["v1", "v2"]}
    assert at(api) == "mesh.star:4:9"
    assert result.files == ("mesh.star",)


def test_multi_line_call_is_located_at_its_first_line_and_nested_calls_at_theirs() -> None:
    result = run(
        {
            "mesh.star": "x = 1\n"
            "service(\n"
            '    name = "web",\n'
            '    retries = retries(attempts = 3, per_try_timeout = "250ms"),\n'
            '    circuit_breaker = circuit_breaker(max_requests = 10), rate_limit = rate_limit(5),\n'
            ")\n"
        }
    )
    (web,) = result.declarations
    assert at(web) == "mesh.star:2:1"
    retries = web.kwargs["retries"]
    assert isinstance(retries, Call) and retries.builtin == "retries"
    assert retries.kwargs == {"attempts": 3, "per_try_timeout": "250ms"}
    assert at(retries) == "mesh.star:4:15"
    assert at(web.kwargs["circuit_breaker"]) == "mesh.star:5:23"
    assert at(web.kwargs["rate_limit"]) == "mesh.star:5:72"


def test_nested_values_arrive_as_plain_data_and_calls() -> None:
    result = run(
        {
            "mesh.star": 'http_route("web", rules = [\n'
            '    rule(match = [match(headers = {"x-user": regex("^a"), "x-b": present()})],\n'
            '         backends = {"v1": 90, "v2": 10}, set_request_headers = {"a": "b"},\n'
            '         remove_request_headers = ("x", "y")),\n'
            "    rule(fault = fault(abort_status = 503, abort_percent = 1.5)),\n"
            "])\n"
        }
    )
    (route,) = result.declarations
    assert route.args == ("web",)
    first, second = route.kwargs["rules"]
    assert first.builtin == "rule" and at(first) == "mesh.star:2:5"
    (m,) = first.kwargs["match"]
    assert m.builtin == "match"
    assert m.kwargs["headers"]["x-user"].builtin == "regex"
    assert m.kwargs["headers"]["x-user"].args == ("^a",)
    assert m.kwargs["headers"]["x-b"].builtin == "present"
    assert first.kwargs["backends"] == {"v1": 90, "v2": 10}
    assert first.kwargs["remove_request_headers"] == ["x", "y"]
    assert second.kwargs["fault"].kwargs == {"abort_status": 503, "abort_percent": 1.5}


def test_a_value_returned_by_a_builtin_can_be_shared() -> None:
    result = run({"mesh.star": 'r = retries(attempts = 1)\nservice(name = "a", retries = r)\nservice(name = "b", retries = r)\n'})
    a, b = result.declarations
    assert a.kwargs["retries"] is b.kwargs["retries"]
    assert at(a.kwargs["retries"]) == "mesh.star:1:5"


def test_calls_inside_functions_of_loaded_files_are_located_there() -> None:
    result = run(
        {
            "mesh.star": 'load("//lib/services.star", "backend")\n\nbackend("api")\nbackend("db")\n',
            "lib/services.star": "# helpers\n"
            "def backend(name):\n"
            '    return service(name = name, timeout = "1s", retries = retries(attempts = 1))\n',
        }
    )
    api, db = result.declarations
    assert api.kwargs["name"] == "api" and db.kwargs["name"] == "db"
    assert at(api) == at(db) == "lib/services.star:3:12"
    assert at(api.kwargs["retries"]) == "lib/services.star:3:59"
    assert api.via == ()
    assert result.files == ("mesh.star", "lib/services.star")


def test_calls_in_loops_and_comprehensions() -> None:
    result = run(
        {
            "mesh.star": 'for name in ["a", "b"]:\n    service(name = name)\n'
            '[request_test("t%d" % i, service = "a") for i in range(2)]\n'
        }
    )
    assert [(c.builtin, at(c)) for c in result.declarations] == [
        ("service", "mesh.star:2:5"),
        ("service", "mesh.star:2:5"),
        ("request_test", "mesh.star:3:2"),
        ("request_test", "mesh.star:3:2"),
    ]


def test_column_skips_names_inside_strings_and_counts_characters() -> None:
    result = run({"mesh.star": 'x = "é"; service(name = "service(", retries = retries())\n'})
    (web,) = result.declarations
    assert at(web) == "mesh.star:1:10"
    assert at(web.kwargs["retries"]) == "mesh.star:1:47"


def test_macro_calls_are_attributed_to_the_users_call() -> None:
    result = run(
        {
            "mesh.star": 'load("@starmesh//traffic.star", "canary")\n'
            'service(name = "web", versions = ["v1", "v2"])\n'
            'x = 1; canary("web", "v1", "v2", 10)\n'
        }
    )
    web, route = result.declarations
    assert route.builtin == "http_route"
    assert at(route) == "mesh.star:3:8"
    assert route.via == ("canary", "_route")
    (rule,) = route.kwargs["rules"]
    assert at(rule) == "mesh.star:3:8" and rule.via == ("canary", "_route")
    assert rule.kwargs["backends"] == {"v1": 90, "v2": 10}
    assert web.via == ()
    assert result.files == ("mesh.star", "@starmesh//traffic.star")


def test_macro_called_under_another_name_still_points_at_the_users_line() -> None:
    result = run({"mesh.star": 'load("@starmesh//traffic.star", shift = "canary")\n\nif True:\n    shift("web", "v1", "v2", 5)\n'})
    (route,) = result.declarations
    assert at(route) == "mesh.star:4:5"


def test_builtins_are_visible_in_every_loaded_module() -> None:
    result = run(
        {
            "mesh.star": 'load("//a.star", "A")\nmesh(name = A)\n',
            "a.star": 'load("//b.star", "B")\nA = "demo"\nservice(name = B)\n',
            "b.star": 'B = "web"\nservice(name = "db")\n',
        }
    )
    assert [(c.builtin, at(c)) for c in result.declarations] == [
        ("service", "b.star:2:1"),
        ("service", "a.star:3:1"),
        ("mesh", "mesh.star:2:1"),
    ]
    assert result.files == ("mesh.star", "a.star", "b.star")


def test_standard_extensions_and_print_are_available() -> None:
    result = run(
        {
            "mesh.star": 's = struct(name = "web")\n'
            'print("ignored")\n'
            'service(name = s.name, versions = json.decode(\'["v1"]\'))\n'
            'name = s.name\n'
            'n = f"{name}-2"\n'
            "service(name = n)\n"
        }
    )
    assert [c.kwargs["name"] for c in result.declarations] == ["web", "web-2"]
    assert result.declarations[0].kwargs["versions"] == ["v1"]


def test_no_clock_randomness_environment_or_files() -> None:
    for name in ("time", "now", "random", "getenv", "environ", "open", "read_file"):
        finding = failure({"mesh.star": f"x = {name}\n"})
        assert finding.code == "SM102", name


def test_result_survives_pickling_and_evaluation_is_deterministic() -> None:
    files = {
        "mesh.star": 'load("@starmesh//traffic.star", "canary")\n'
        'mesh(name = "demo")\n'
        'service(name = "web", retries = retries(attempts = 2))\n'
        'canary("web", "v1", "v2", 25)\n'
    }
    first, second = run(files), run(files)
    assert _plain(first.declarations) == _plain(second.declarations)
    assert first.files == second.files
    assert _plain(pickle.loads(pickle.dumps(first)).declarations) == _plain(first.declarations)


def _plain(value: object) -> object:
    if isinstance(value, Call):
        return (value.builtin, _plain(value.args), _plain(value.kwargs), str(value.location), value.via)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# -- load() ------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["//lib/x.star", "lib/x.star", "./lib/x.star", "//lib//x.star"])
def test_root_relative_labels(label: str) -> None:
    result = run({"mesh.star": f'load("{label}", "X")\nservice(name = X)\n', "lib/x.star": 'X = "web"\n'})
    assert result.declarations[0].kwargs == {"name": "web"}
    assert result.files == ("mesh.star", "lib/x.star")


def test_labels_are_relative_to_the_root_even_from_a_subdirectory() -> None:
    result = run(
        {
            "mesh.star": 'load("//lib/a.star", "A")\nservice(name = A)\n',
            "lib/a.star": 'load("lib/b.star", "B")\nA = B\n',
            "lib/b.star": 'B = "web"\n',
        }
    )
    assert result.declarations[0].kwargs == {"name": "web"}


def test_module_cache_evaluates_each_file_once() -> None:
    result = run(
        {
            "mesh.star": 'load("//a.star", "A")\nload("//b.star", "B")\nload("//shared.star", "S")\n',
            "a.star": 'load("//shared.star", "S")\nA = S\n',
            "b.star": 'load("//shared.star", "S")\nB = S\n',
            "shared.star": 'S = 1\nservice(name = "shared")\n',
        }
    )
    assert [c.kwargs["name"] for c in result.declarations] == ["shared"]
    assert result.files == ("mesh.star", "a.star", "shared.star", "b.star")


@pytest.mark.parametrize(
    ("label", "words"),
    [
        ("/etc/passwd.star", "absolute path"),
        ("///etc/x.star", "absolute path"),
        ("//../outside.star", "`..`"),
        ("lib/../../outside.star", "`..`"),
        ("lib/../x.star", "`..`"),
        ("lib/x\\x00.star", "NUL byte"),
        ("lib\\\\x.star", "backslash"),
        ("@other//x.star", "unknown repository"),
        ("@starmesh//missing.star", "the starmesh library has no file missing.star"),
        ("//lib/secret.txt", "does not name a .star file"),
        ("//lib/missing.star", "no file lib/missing.star"),
    ],
)
def test_load_rejections(label: str, words: str) -> None:
    files = {
        "mesh.star": f'mesh(name = "demo")\nY = 1; load("{label}", "X")\n',
        "lib/x.star": 'X = "SECRET CONTENTS"\n',
        "lib/secret.txt": "SECRET CONTENTS",
    }
    finding = failure(files)
    assert finding.code == "SM104"
    assert (finding.file, finding.line, finding.col) == ("mesh.star", 2, 8)
    assert words in finding.message
    assert "SECRET" not in finding.message and "SECRET" not in (finding.hint or "")


def test_missing_and_private_symbols() -> None:
    files = {"mesh.star": 'load("//lib.star", "A", "B")\n', "lib.star": "A = 1\n"}
    finding = failure(files)
    assert (finding.code, finding.line, finding.col) == ("SM104", 1, 25)
    assert "B" in finding.message
    finding = failure({"mesh.star": 'load("//lib.star", "_a")\n', "lib.star": "_a = 1\n"})
    assert finding.code == "SM104" and "private" in finding.message


def test_library_may_not_load_policy_files() -> None:
    library = {"@starmesh//evil.star": 'load("//mesh.star", "X")\n'}
    with pytest.raises(EvaluationError) as caught:
        run({"mesh.star": 'load("@starmesh//evil.star", "Y")\n'}, library=library)
    (finding,) = caught.value.findings
    assert finding.code == "SM104"


def test_load_cycle_reports_the_chain_at_the_closing_load() -> None:
    finding = failure(
        {
            "mesh.star": 'load("//lib/a.star", "A")\n',
            "lib/a.star": 'load("//lib/b.star", "B")\nA = 1\n',
            "lib/b.star": 'B = 2\n\nload("//lib/a.star", "A")\n',
        }
    )
    assert finding.code == "SM105"
    assert finding.message == "load cycle: mesh.star -> //lib/a.star -> //lib/b.star -> //lib/a.star"
    assert (finding.file, finding.line, finding.col) == ("lib/b.star", 3, 1)


def test_a_file_loading_itself_is_a_cycle() -> None:
    finding = failure({"mesh.star": 'load("//mesh.star", "X")\nX = 1\n'})
    assert finding.code == "SM105"
    assert "mesh.star -> mesh.star" in finding.message


def test_missing_entry_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="main.star"):
        run({"mesh.star": ""}, entry="main.star")
    assert issubclass(SourceError, CompilerError) and issubclass(EvaluationError, CompilerError)


def test_other_entry_file() -> None:
    result = run({"mesh.star": "fail('not me')\n", "policy/main.star": 'service(name = "web")\n'}, entry="policy/main.star")
    assert at(result.declarations[0]) == "policy/main.star:1:1"


# -- errors become findings --------------------------------------------------------------


def test_syntax_error() -> None:
    finding = failure({"mesh.star": 'mesh(name = "demo")\nx = 1 +\n'})
    assert (finding.code, finding.severity, finding.line, finding.col) == ("SM101", "error", 2, 8)
    assert finding.message.startswith("syntax error: ")
    assert "\n" not in finding.message


def test_unclosed_call_points_at_the_opening_bracket() -> None:
    finding = failure({"mesh.star": 'mesh(name = "demo")\n\nservice(name = "web", port = 8080\n'})
    assert (finding.code, finding.line, finding.col) == ("SM101", 3, 8)


def test_syntax_error_in_a_loaded_file() -> None:
    finding = failure({"mesh.star": 'load("//lib.star", "A")\n', "lib.star": "A = [\n  1,,\n]\n"})
    assert (finding.code, finding.file, finding.line) == ("SM101", "lib.star", 2)


def test_unknown_name_with_a_hint() -> None:
    finding = failure({"mesh.star": 'mesh(name = "demo")\nservce(name = "web")\n'})
    assert (finding.code, finding.line, finding.col) == ("SM102", 2, 1)
    assert finding.message == "unknown name `servce`"
    assert finding.hint == "did you mean `service`?"
    finding = failure({"mesh.star": "ports = 1\ny = port\n"})
    assert finding.code == "SM102" and finding.hint == "did you mean `ports`?"


def test_evaluation_errors() -> None:
    finding = failure({"mesh.star": 'x = 1\nfail("weights must sum to 100")\n'})
    assert (finding.code, finding.line, finding.col) == ("SM103", 2, 1)
    assert finding.message == "fail: weights must sum to 100"
    finding = failure({"mesh.star": 'service(name = "v" + 1)\n'})
    assert finding.code == "SM103" and "not supported" in finding.message
    assert "Traceback" not in finding.message and "\n" not in finding.message


def test_error_inside_a_loaded_function_is_reported_there() -> None:
    finding = failure(
        {
            "mesh.star": 'load("//lib.star", "f")\nf()\n',
            "lib.star": 'def f():\n    return int("x")\n',
        }
    )
    assert (finding.code, finding.file, finding.line) == ("SM103", "lib.star", 2)


def test_error_inside_the_library_is_reported_at_the_users_call() -> None:
    finding = failure(
        {"mesh.star": 'load("@starmesh//traffic.star", "canary")\n\ncanary("web", "v1", "v2", "ten")\n'}
    )
    assert (finding.code, finding.file, finding.line, finding.col) == ("SM103", "mesh.star", 3, 1)
    assert "@starmesh//traffic.star:2" in finding.message


def test_unconvertible_argument() -> None:
    finding = failure({"mesh.star": 'mesh(name = "demo")\nservice(name = lambda: 1)\n'})
    assert (finding.code, finding.file, finding.line, finding.col) == ("SM103", "mesh.star", 2, 1)
    assert "cannot be passed to a builtin" in finding.message


def test_the_parent_reads_only_result_types_from_the_worker() -> None:
    import io
    import os

    from starmesh.compiler.evaluate import _ResultUnpickler

    with pytest.raises(pickle.UnpicklingError, match="forbidden type"):
        _ResultUnpickler(io.BytesIO(pickle.dumps(os.system))).load()
    location = SourceLocation(file="mesh.star", line=1, col=1)
    call = Call("service", (), {"name": "web"}, location)
    assert _ResultUnpickler(io.BytesIO(pickle.dumps(call))).load().location == location
