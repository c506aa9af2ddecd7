"""`starmesh compile`: policy tree -> canonical bundle bytes and their digest.

Also home of what `lint` and `compile` share: reading the tree given on the command line
(`load_policy`, which turns a missing root or entry into exit 2 with a one-line message).
`InputError`, the command line's "bad usage or input" exception, lives in
starmesh.cli.errors (so raising it loads no compiler) and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import click

from starmesh.bundle import files
from starmesh.cli.console import Consoles
from starmesh.cli.errors import InputError
from starmesh.cli.render import PolicyFiles, render_concise, render_full, render_summary
from starmesh.compiler.compile import CompileResult, compile_tree
from starmesh.compiler.errors import SourceError

__all__ = ["InputError", "compile_command", "load_policy", "policy_files", "write_atomically"]

ENTRY_HELP = "Entry file, relative to the policy root."


def load_policy(root: Path, entry: str) -> CompileResult:
    """Compile the policy tree at `root` (entry file `entry`, relative to it).

    Raises InputError when the tree or its entry file cannot be read."""
    if not root.exists():
        raise InputError(f"policy root {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a directory (give the policy root, the folder that holds {entry})")
    entry_path = PurePosixPath(entry)
    if entry_path.is_absolute() or ".." in entry_path.parts or not entry:
        raise InputError(f"--entry {entry!r} must be a path inside the policy root, relative to it")
    if not (root / entry_path).is_file():
        where = Path.cwd() if root == Path(".") else root
        raise InputError(f"no {entry} in {where} (use --entry to pick another entry file)")
    try:
        return compile_tree(root, entry_path.as_posix())  # "./mesh.star" names "mesh.star"
    except SourceError as exc:
        raise InputError(str(exc)) from exc
    except OSError as exc:  # the tree changed or turned unreadable while it was being read
        raise InputError(f"cannot read the policy tree at {root}: {exc}") from exc


def policy_files(root: Path, result: CompileResult) -> PolicyFiles:
    """What rendering needs to show the compiled files' lines, paths relative to the cwd."""
    texts = {**result.source.library, **result.source.files}
    return PolicyFiles(root=root, cwd=Path.cwd(), texts=texts)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part
    (bundle/files.py); InputError saying why when it cannot be written."""
    directory = path.parent
    if not directory.is_dir():
        raise InputError(f"cannot write {path}: directory {directory} does not exist")
    try:
        files.write_atomically(path, data)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc


@click.command("compile")
@click.argument("path", default=".", metavar="[PATH]", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the bundle's canonical bytes to FILE (atomically).",
)
@click.option("--entry", default="mesh.star", show_default=True, metavar="FILE", help=ENTRY_HELP)
@click.pass_context
def compile_command(ctx: click.Context, path: Path, output: Path | None, entry: str) -> None:
    """Compile the policy tree at PATH (default: the current directory) into a bundle.

    Evaluates the Starlark, validates it, runs the golden requests and prints the
    bundle's identity, sha256:<hex> of its canonical JSON bytes, as the only line on
    stdout. The same policy files give the same bytes and digest on any machine and
    from any directory. Warnings go to stderr and do not fail the build. On errors
    the findings go to stderr, nothing is written and the exit code is 1; a missing
    tree or entry file exits 2.

    \b
    Examples:
      starmesh compile                          # ./mesh.star
      starmesh compile policies/ -o bundle.json
      starmesh compile . --entry staging.star
    """
    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    result = load_policy(path, entry)
    files = policy_files(path, result)
    if not result.ok or result.data is None or result.digest is None:
        render_full(consoles.err, result.findings, files)
        render_summary(consoles.err, result.errors, result.warnings)
        ctx.exit(1)
    render_concise(consoles.err, result.findings, files)
    if output is not None:
        write_atomically(output, result.data)
    click.echo(result.digest)
