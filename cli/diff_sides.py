"""The two sides `starmesh diff` compares: found, read and compiled.

    BASE / HEAD revision  ──read_commit (Git objects, never the work tree)──► compile ─┐
    the working tree      ──read_directory (the files as they are now)──────► compile ─┼─► CompiledSide
    --against URL         ──GET /v1/status ─► release's digest ─► GET /v1/bundles/D ───┘   (bundle + Side)
                                              (sha256 of the bytes checked, then decoded)

`--repo PATH` is the policy root and may be a folder inside a Git work tree: the
repository is found from it (as `git` finds it from the current directory) and
commits are read from the same folder of each commit. A repository is looked for only
when a revision is asked for, so `--against URL` with the working tree works outside
Git too.

Everything that stops a side is an `InputError` (exit 2, one line). A side that does
not compile is `SideDoesNotCompile`, carrying the findings for the command to print
the way `starmesh compile` does, before its one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starmesh.bundle.canonical import Bundle, decode_bundle, digest_of, is_digest
from starmesh.bundle.errors import BundleError
from starmesh.cli.compile import load_policy
from starmesh.cli.control_client import call_control_plane, printable
from starmesh.cli.errors import InputError
from starmesh.compiler.compile import CompileResult, compile_commit
from starmesh.compiler.errors import SourceError
from starmesh.preview.model import Side

__all__ = [
    "MAX_BUNDLE_BYTES",
    "CompiledSide",
    "PolicyRepo",
    "SideDoesNotCompile",
    "control_plane_side",
    "revision_side",
    "working_tree_side",
]

MAX_BUNDLE_BYTES = 64 << 20
"""The largest bundle read from a control plane (what a proxy accepts, docs/control-plane.md)."""

_SHORT = 12


@dataclass(frozen=True)
class CompiledSide:
    """One side, ready to compare: its bundle and how the report names it."""

    side: Side
    bundle: Bundle


class SideDoesNotCompile(InputError):
    """A side's policy has errors: `result` holds its findings; the message names the side."""

    def __init__(self, label: str, result: CompileResult) -> None:
        count = f"{result.errors} error{'' if result.errors == 1 else 's'}"
        super().__init__(f"{label} does not compile ({count}); fix it, or compare other revisions")
        self.label, self.result = label, result


@dataclass(frozen=True)
class PolicyRepo:
    """The Git repository holding the policy root, and the root's folder inside it
    ("" when the root is the work tree's top)."""

    path: Path
    subdir: str

    @classmethod
    def find(cls, root: Path) -> PolicyRepo:
        """The repository `root` is in (searching its parents); InputError when there is none."""
        import git

        if not root.is_dir():
            raise InputError(f"--repo {root}: no such directory (give the policy root, the folder that holds mesh.star)")
        try:
            repository = git.Repo(str(root), search_parent_directories=True)
        except (git.exc.InvalidGitRepositoryError, git.exc.NoSuchPathError):
            raise InputError(f"{root.resolve()} is not in a Git repository; without one, compare with --against URL") from None
        with repository:
            top = repository.working_tree_dir
            if top is None:  # a bare repository: its commits' top folder is the policy root
                return cls(Path(repository.git_dir), "")
            try:
                subdir = root.resolve().relative_to(Path(top).resolve()).as_posix()
            except ValueError:  # e.g. inside the .git folder
                raise InputError(f"--repo {root} is not inside the work tree of {top}") from None
        return cls(Path(top), "" if subdir == "." else subdir)


def revision_side(repo: PolicyRepo, rev: str, entry: str) -> CompiledSide:
    """The policy at revision `rev`, compiled (its label: `rev (commit)`)."""
    import git

    if not rev or rev.startswith("-") or any(c in rev for c in "\0\r\n"):
        raise InputError(f"{rev!r} is not a Git revision (give a commit, branch or tag, e.g. HEAD~1 or origin/main)")
    try:
        result = compile_commit(repo.path, rev, repo.subdir, entry)
    except SourceError as exc:
        raise InputError(str(exc)) from exc
    except git.exc.GitError as exc:  # corrupt objects, a broken repository
        raise InputError(f"{repo.path}: cannot read revision {rev!r}: {exc}") from exc
    commit = result.source.commit
    label = f"{rev} ({commit[:_SHORT]})" if commit else rev
    return _compiled(label, result)


def working_tree_side(root: Path, entry: str) -> CompiledSide:
    """The policy files under `root` as they are now, committed or not."""
    return _compiled("working tree", load_policy(root, entry))


def _compiled(label: str, result: CompileResult) -> CompiledSide:
    if result.bundle is None or result.digest is None:
        raise SideDoesNotCompile(label, result)
    return CompiledSide(Side(label=label, commit=result.source.commit, digest=result.digest), result.bundle)


def control_plane_side(url: str, *, ca_cert: Path | None) -> CompiledSide:
    """The bundle of the control plane's current release (its `/v1/status` names it),
    fetched by digest and checked against it."""
    import urllib.parse

    from starmesh.cli.status import parse_status

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InputError(f"--against {url!r} is not an http:// or https:// base URL with a host (e.g. https://127.0.0.1:8443)")
    status, _ = parse_status(call_control_plane(url, "/v1/status", ca_cert=ca_cert))
    release = status.release
    if release is None:
        raise InputError(f"the control plane at {url} has no release yet (nothing compiled or loaded): nothing to compare against")
    digest = release.bundle
    if not is_digest(digest):
        raise InputError(f"the control plane at {url} names {printable(digest[:80])!r} as its bundle, which is not a sha256 digest")
    answer = call_control_plane(url, f"/v1/bundles/{digest}", ca_cert=ca_cert, limit=MAX_BUNDLE_BYTES)
    if answer.status != 200:
        raise InputError(f"control plane at {answer.url} answered HTTP {answer.status}: {answer.error_text()}")
    actual = digest_of(answer.body)
    if actual != digest:
        raise InputError(f"the bundle served at {answer.url} hashes to {actual}, not to its name: not comparing against it")
    try:
        bundle = decode_bundle(answer.body)  # its digest is checked just above
    except BundleError as exc:
        raise InputError(f"the bundle served at {answer.url} cannot be read: {exc}") from exc
    label = f"control plane {url.rstrip('/')} (release {release.version})"
    return CompiledSide(Side(label=printable(label), commit=release.commit or bundle.source.commit, digest=digest), bundle)
