"""The CLI loads a subcommand's module only when that command runs (starmesh.cli.main).

An idle `starmesh proxy` is held to a memory budget; the compiler, Git, the preview and
the reconciler, and every other command's code, are megabytes it has no use for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from starmesh.cli.main import COMMANDS, LazyGroup, main

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1"])
http_route("api", rules = [rule(backends = {"v1": 100})])
request_test(name = "api goes to v1", service = "api", backends = "v1")
"""

NOT_FOR_THE_PROXY = ("starmesh.compiler", "starmesh.preview", "starmesh.reconciler", "starlark", "git")
"""Modules (and their submodules) a `--bundle` proxy never needs."""
DEADLINE = 30.0
"""Seconds to wait for the proxy's status line; a bound on waiting, never an assertion about speed."""


RUN_AND_LIST_MODULES = """
import atexit, runpy, sys
listing = sys.argv.pop(1)
atexit.register(lambda: open(listing, "w").write("\\n".join(sorted(sys.modules))))
runpy.run_module("starmesh.cli", run_name="__main__", alter_sys=True)
"""
"""`python -m starmesh.cli ARGS`, which writes every module it had loaded to the file named
by its first argument when it exits (-X importtime cannot see `importlib.import_module`)."""


def _module(target: str) -> str:
    """The module of a "module:attribute" target."""
    return target.partition(":")[0]


def test_a_bundle_proxy_imports_no_other_command_and_no_compiler(tmp_path: Path, mesh: Any) -> None:
    bundle = mesh.bundle(POLICY)  # compiled here, in the test process
    endpoints = mesh.endpoints({"api": {"v1": ["127.0.0.1:9"]}})
    listed = tmp_path / "modules.txt"
    argv = [sys.executable, "-c", RUN_AND_LIST_MODULES, str(listed), "proxy", "--service", "web", "--version", "v1"]
    argv += ["--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    argv += ["--state-dir", str(tmp_path / "state"), "--bundle", str(bundle), "--endpoints", str(endpoints)]
    proxy = mesh.start("proxy", argv, stderr=tmp_path / "proxy.log")
    status = proxy.first_line(lambda line: line.startswith(("ready ", "not ready: ")), "a status line", DEADLINE)
    assert status.startswith("ready sha256:")
    assert proxy.stop() == 0

    imported = set(listed.read_text().split())
    assert {"starmesh.cli.main", "starmesh.cli.proxy", "starmesh.runtime.proxy"} <= imported  # the listing works
    heavy = {name for name in imported for only in NOT_FOR_THE_PROXY if f"{name}.".startswith(f"{only}.")}
    assert heavy == set()
    other_commands = {_module(target) for name, target in COMMANDS.items() if name != "proxy"}
    assert other_commands & imported == set()


def test_help_lists_every_command_with_its_short_help() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("\nCommands:\n", 1)[1].splitlines()
    names = [line.split()[0] for line in listed if line.strip()]
    assert names == sorted(COMMANDS)
    assert all(len(line.split()) > 1 for line in listed if line.strip())  # each with its help
    assert [line.split()[0] for line in listed if "Run the sidecar proxy" in line] == ["proxy"]


def test_a_group_runs_its_lazy_subcommands() -> None:
    result = CliRunner().invoke(main, ["ca", "--help"])
    assert result.exit_code == 0, result.output
    assert "init" in result.output.split("Commands:", 1)[1]


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output


@pytest.mark.parametrize(
    "target", ["starmesh.cli.proxy:__all__", "starmesh.cli.proxy:proxy_command"], ids=["not-a-command", "other-name"]
)
def test_a_wrong_entry_in_the_table_is_refused(target: str) -> None:
    group = LazyGroup("g", lazy={"lint": target})
    with pytest.raises(TypeError, match="is not the click command 'lint'"):
        group.get_command(click.Context(group), "lint")
