"""PolicySource: the policy files at one commit (or one directory), read once.

Evaluation never touches the file system or Git: everything it may load is in
`PolicySource.files`, keyed by path relative to the policy root ("mesh.star",
"lib/routes.star"). The shipped library is keyed "@starmesh//NAME.star".

Readers:
  read_directory(root)          the *.star files under a directory (a working tree)
  read_commit(repo, rev)        the *.star files of one commit, from Git's objects only
  library_files()               the shipped policies/*.star

Both readers refuse what could leak files from outside the policy root (symlinks that
leave it, entries with `..` or absolute paths) and bound how much they read.
"""

from __future__ import annotations

import importlib.resources
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Mapping

from starmesh.compiler.errors import SourceError

if TYPE_CHECKING:
    import git

__all__ = [
    "MAX_FILES",
    "MAX_SCANNED_ENTRIES",
    "MAX_TOTAL_BYTES",
    "PolicySource",
    "library_files",
    "read_commit",
    "read_directory",
]

MAX_FILES = 10_000
"""Most .star files a policy tree may hold."""
MAX_TOTAL_BYTES = 64 << 20
"""Most bytes of .star files a policy tree may hold."""
MAX_SCANNED_ENTRIES = 200_000
"""Most directory entries read_directory looks at (symlinked directories count again)."""

_LIBRARY_PACKAGE = "starmesh.policies"
_LIBRARY_PREFIX = "@starmesh//"
_GIT_SYMLINK = 0o120000
_GIT_SUBMODULE = 0o160000
_MAX_SYMLINK_HOPS = 16


@dataclass(frozen=True)
class PolicySource:
    """The policy tree to evaluate: files by root-relative path, the entry file, the commit."""

    files: Mapping[str, str]
    entry: str = "mesh.star"
    commit: str | None = None
    library: Mapping[str, str] = field(default_factory=dict)


def library_files() -> dict[str, str]:
    """The shipped library (`policies/*.star`), keyed "@starmesh//NAME.star"."""
    files: dict[str, str] = {}
    for item in importlib.resources.files(_LIBRARY_PACKAGE).iterdir():
        if item.name.endswith(".star") and item.is_file():
            files[_LIBRARY_PREFIX + item.name] = item.read_text(encoding="utf-8")
    return dict(sorted(files.items()))


def _entry_key(entry: str) -> str:
    """The entry as a root-relative POSIX key; SourceError when it could leave the root."""
    if not entry or "\x00" in entry or "\\" in entry:
        raise SourceError(f"entry {entry!r} is not a valid path; give a path relative to the policy root")
    path = PurePosixPath(entry)
    if path.is_absolute() or ".." in path.parts:
        raise SourceError(f"entry {entry!r} must be a path inside the policy root, relative to it (e.g. mesh.star)")
    key = "/".join(p for p in path.parts if p != ".")
    if not key:
        raise SourceError(f"entry {entry!r} names no file; give a path like mesh.star")
    return key


class _Budget:
    """Counts files and bytes read against the caps."""

    def __init__(self, where: str, max_files: int, max_bytes: int) -> None:
        self.where, self.max_files, self.max_bytes = where, max_files, max_bytes
        self.files = 0
        self.bytes = 0

    def take(self, key: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > self.max_files:
            raise SourceError(f"{self.where} holds more than {self.max_files} .star files; point at the policy directory")
        if self.bytes > self.max_bytes:
            raise SourceError(
                f"{self.where} holds more than {self.max_bytes} bytes of .star files (at {key}); "
                "point at the policy directory"
            )


def _decode(data: bytes, key: str, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: {key} is not UTF-8 text (byte {exc.start}); policy files must be UTF-8") from exc


def _finish(files: dict[str, str], entry: str, commit: str | None, where: str) -> PolicySource:
    if entry not in files:
        raise SourceError(f"{where} has no entry file {entry}; create it or pass --entry")
    return PolicySource(files=dict(sorted(files.items())), entry=entry, commit=commit, library=library_files())


# -- directories -----------------------------------------------------------------------


def read_directory(
    root: Path,
    entry: str = "mesh.star",
    *,
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_TOTAL_BYTES,
) -> PolicySource:
    """Every `*.star` file below `root` (dot-directories skipped), keyed root-relative.

    Symlinks are followed only while they stay inside `root`; one that leaves it is a
    SourceError, as are a missing root or entry and a tree past the caps.
    """
    entry_key = _entry_key(entry)
    try:
        real_root = Path(root).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise SourceError(f"policy root {root} does not exist or cannot be read: {exc}") from exc
    if not real_root.is_dir():
        raise SourceError(f"policy root {root} is not a directory")
    where = f"policy root {root}"
    budget = _Budget(where, max_files, max_bytes)
    files: dict[str, str] = {}
    for key, path in _walk(real_root, real_root, "", (), [0]):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SourceError(f"{where}: cannot read {key}: {exc.strerror}") from exc
        budget.take(key, len(data))
        files[key] = _decode(data, key, where)
    return _finish(files, entry_key, None, where)


def _inside(real_root: Path, path: Path) -> bool:
    return path == real_root or real_root in path.parents


def _walk(
    real_root: Path, directory: Path, prefix: str, ancestors: tuple[Path, ...], scanned: list[int]
) -> Iterator[tuple[str, Path]]:
    """(key, real path) of each .star file below `directory`, which is inside the root.

    A directory symlink back to a directory being walked (a loop) is skipped; `scanned`
    counts directory entries against MAX_SCANNED_ENTRIES."""
    ancestors = (*ancestors, directory)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(f"cannot list {prefix or '.'} in the policy root: {exc.strerror}") from exc
    scanned[0] += len(entries)
    if scanned[0] > MAX_SCANNED_ENTRIES:
        raise SourceError(
            f"the policy root holds more than {MAX_SCANNED_ENTRIES} files and directories; point at the policy directory"
        )
    for item in entries:
        key = prefix + item.name
        if item.name.startswith(".") and item.is_dir():
            continue
        if item.is_symlink():
            try:
                target = Path(item.path).resolve(strict=True)
            except (OSError, RuntimeError):
                if item.name.endswith(".star"):
                    raise SourceError(f"{key} is a broken symlink; fix or remove it") from None
                continue
            if not _inside(real_root, target):
                if item.name.endswith(".star") or target.is_dir():
                    raise SourceError(
                        f"{key} is a symlink that points outside the policy root; policy files must live inside it"
                    )
                continue
        else:
            target = Path(item.path)
        try:
            mode = target.stat().st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            real = target.resolve()
            if real in ancestors:
                continue
            yield from _walk(real_root, real, key + "/", ancestors, scanned)
        elif stat.S_ISREG(mode) and item.name.endswith(".star"):
            yield key, target


# -- Git commits -----------------------------------------------------------------------


def read_commit(
    repo: Path,
    rev: str = "HEAD",
    subdir: str = "",
    entry: str = "mesh.star",
    *,
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_TOTAL_BYTES,
) -> PolicySource:
    """Every `*.star` blob under `subdir` in commit `rev` of `repo`, keyed relative to `subdir`.

    Reads Git's objects, never the working tree. Symlinks in the tree are followed only
    within `subdir`; `commit` is the commit's full hex sha.
    """
    import git  # gitpython: only readers of commits pay for importing it

    entry_key = _entry_key(entry)
    sub = _subdir_key(subdir)
    try:
        repository = git.Repo(str(repo))
    except (git.exc.InvalidGitRepositoryError, git.exc.NoSuchPathError) as exc:
        raise SourceError(f"{repo} is not a Git repository") from exc
    with repository:
        try:
            commit = repository.commit(rev)
        except (git.exc.BadName, git.exc.BadObject, ValueError) as exc:
            raise SourceError(f"{repo}: unknown revision {rev!r}") from exc
        where = f"commit {commit.hexsha[:12]}" + (f" ({sub}/)" if sub else "")
        tree = commit.tree
        if sub:
            try:
                tree = tree / sub
            except KeyError:
                raise SourceError(f"{repo}: {where} has no directory {sub}") from None
            if tree.type != "tree":
                raise SourceError(f"{repo}: {sub} is not a directory in commit {commit.hexsha[:12]}")
        blobs = _tree_blobs(tree)
        budget = _Budget(where, max_files, max_bytes)
        files: dict[str, str] = {}
        for key in sorted(blobs):
            if not key.endswith(".star"):
                continue
            blob = _follow(blobs, key, where)
            if blob is None:
                continue
            data: bytes = blob.data_stream.read()
            budget.take(key, len(data))
            files[key] = _decode(data, key, where)
        return _finish(files, entry_key, commit.hexsha, where)


def _subdir_key(subdir: str) -> str:
    if "\x00" in subdir or "\\" in subdir:
        raise SourceError(f"policy subdirectory {subdir!r} is not a valid path")
    path = PurePosixPath(subdir)
    if path.is_absolute() or ".." in path.parts:
        raise SourceError(f"policy subdirectory {subdir!r} must be relative to the repository root, without `..`")
    return "/".join(p for p in path.parts if p != ".")


def _tree_blobs(tree: git.Tree) -> dict[str, git.Blob]:
    """Every blob below `tree` (dot-directories skipped), keyed relative to it."""
    base = str(tree.path) + "/" if tree.path else ""
    blobs: dict[str, git.Blob] = {}
    pending = [tree]
    while pending:
        current = pending.pop()
        for item in current:
            if item.type == "tree":
                if not item.name.startswith("."):
                    pending.append(item)
            elif item.type == "blob" and item.mode != _GIT_SUBMODULE:
                blobs[str(item.path)[len(base) :]] = item
    return blobs


def _follow(blobs: Mapping[str, git.Blob], key: str, where: str) -> git.Blob | None:
    """The regular blob `key` names, following symlink blobs within the tree."""
    current = key
    for _ in range(_MAX_SYMLINK_HOPS):
        blob = blobs.get(current)
        if blob is None:
            raise SourceError(f"{where}: {key} is a symlink to a file that is not in the policy tree")
        if blob.mode & 0o170000 != _GIT_SYMLINK:
            return blob
        target = blob.data_stream.read().decode("utf-8", errors="replace")
        if target.startswith("/"):
            raise SourceError(f"{where}: {key} is a symlink that points outside the policy root")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(current), target))
        if joined == ".." or joined.startswith("../"):
            raise SourceError(f"{where}: {key} is a symlink that points outside the policy root")
        current = joined
    raise SourceError(f"{where}: {key} is a symlink loop")
