"""Packaging and the repository's promises: namespace layout, shipped policies, README, CI.

README.md's contract: right after the title come exactly two set-up commands, each a
fenced ```sh block holding one command line, and nothing else before them: the first
installs starmesh and runs the main job, the second installs the test tools and runs
the tests. `.ci/run` runs that second line verbatim.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bundle", "compiler", "runtime", "reconciler", "preview", "cli", "policies")

_FENCE = re.compile(r"^```")


def setup_commands(readme: str) -> list[str]:
    """The set-up commands at the top of a README, per the contract above.

    Raises AssertionError saying what is wrong with the README's opening.
    """
    lines = readme.splitlines()
    assert lines and lines[0].startswith("# "), "README.md must start with a '# title' line"
    commands: list[str] = []
    index = 1
    while True:
        while index < len(lines) and not lines[index].strip():
            index += 1
        if index >= len(lines) or not _FENCE.match(lines[index]):
            break
        opening = lines[index].strip()
        assert opening in ("```sh", "```bash", "```shell", "```console"), (
            f"README.md line {index + 1}: set-up blocks must be ```sh blocks, got {opening!r}"
        )
        end = index + 1
        while end < len(lines) and not _FENCE.match(lines[end]):
            end += 1
        assert end < len(lines), f"README.md line {index + 1}: unclosed code block"
        body = [line for line in lines[index + 1 : end] if line.strip()]
        assert len(body) == 1, (
            f"README.md line {index + 1}: a set-up block must hold exactly one command "
            f"line, found {len(body)}"
        )
        commands.append(body[0].strip())
        index = end + 1
    return commands


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    commands = setup_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) == 2, f"README.md opens with {len(commands)} set-up commands: {commands}"
    run, test = commands
    assert run.startswith("python3 -m venv .venv && ") and "starmesh " in run
    assert test.startswith("python3 -m venv .venv && ") and "[test]" in test
    assert test.endswith(".venv/bin/pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, test = setup_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command_lines = [
        line.strip() for line in ci.splitlines() if not line.lstrip().startswith("#")
    ]
    assert any(line == test or line.startswith(test + " ||") for line in command_lines), (
        f".ci/run must run README.md's test command verbatim:\n  {test}"
    )


def test_ci_script_is_executable_and_strict() -> None:
    ci = ROOT / ".ci" / "run"
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable (chmod +x .ci/run)"
    text = ci.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


def test_setup_commands_parser_rejects_bad_openings() -> None:
    with pytest.raises(AssertionError, match="exactly one command"):
        setup_commands("# t\n\n```sh\na\nb\n```\n")
    with pytest.raises(AssertionError, match="unclosed"):
        setup_commands("# t\n```sh\na\n")
    assert setup_commands("# t\n\nprose first\n\n```sh\na\n```\n") == []
    assert setup_commands("# t\n```sh\na\n```\n\n```sh\nb\n```\ntext\n```sh\nc\n```\n") == [
        "a",
        "b",
    ]


@pytest.mark.parametrize("folder", FOLDERS)
def test_bare_folder_names_are_not_importable(folder: str) -> None:
    # `import compiler` would load a second copy of every class beside starmesh.compiler.
    assert importlib.util.find_spec(folder) is None, (
        f"`import {folder}` works: the repository root is on sys.path (run the tests as "
        "`.venv/bin/pytest`, not `python -m pytest`)"
    )
    assert importlib.util.find_spec(f"starmesh.{folder}") is not None


@pytest.mark.parametrize("folder", FOLDERS)
def test_packages_come_from_the_repository_folders(folder: str) -> None:
    spec = importlib.util.find_spec(f"starmesh.{folder}")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().parent.name == folder


def test_starmesh_is_a_namespace_package() -> None:
    spec = importlib.util.find_spec("starmesh")
    assert spec is not None
    assert spec.origin in (None, "namespace"), "starmesh must have no __init__.py"


def test_installed_policies_hold_the_shipped_star_files() -> None:
    shipped = sorted(path.name for path in (ROOT / "policies").glob("*.star"))
    assert shipped, "policies/ holds no .star files"
    installed = sorted(
        item.name
        for item in importlib.resources.files("starmesh.policies").iterdir()
        if item.name.endswith(".star")
    )
    assert installed == shipped
    for name in installed:
        text = importlib.resources.files("starmesh.policies").joinpath(name).read_text("utf-8")
        assert text == (ROOT / "policies" / name).read_text(encoding="utf-8")


def test_every_package_ships_py_typed() -> None:
    for folder in ("bundle", "compiler", "runtime", "reconciler", "preview", "cli"):
        assert (ROOT / folder / "py.typed").is_file(), f"{folder}/py.typed is missing"


def test_pre_commit_hook_runs_starmesh_lint() -> None:
    text = (ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8")
    assert "- id: starmesh-lint" in text
    assert "entry: starmesh lint" in text
    assert "language: python" in text
    assert "pass_filenames: false" in text
    assert "files: \\.star$" in text


def test_pyproject_lists_every_package() -> None:
    """setuptools ships only the packages listed: a new subpackage must be added there."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"starmesh.{folder}": folder for folder in FOLDERS}
    on_disk = {
        "starmesh." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert not (ROOT / "starmesh").exists(), "starmesh/ must not exist: it is a namespace"
    without_init = sorted(
        str(directory.relative_to(ROOT))
        for folder in FOLDERS
        for directory in {path.parent for path in (ROOT / folder).rglob("*.py")}
        if not (directory / "__init__.py").is_file()
    )
    assert not without_init, f"add an __init__.py (or the modules are not shipped): {without_init}"
    missing = sorted(on_disk - set(setuptools["packages"]))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(set(setuptools["packages"]) - on_disk)
    assert not stale, f"listed in pyproject.toml but not on disk: {stale}"
