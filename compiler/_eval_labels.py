"""Resolving `load()` labels to policy files, without touching the file system.

Labels (DESIGN.md): `//lib/x.star` and `lib/x.star` both name a file from the policy
root; `@starmesh//NAME.star` names a file of the shipped library. Anything that could
reach outside the tree (absolute paths, `..`, backslashes, NUL bytes) is refused before
a file is looked up, and messages never quote file contents.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["LIBRARY_PREFIX", "LabelError", "display_label", "resolve_label"]

LIBRARY_PREFIX = "@starmesh//"

_MAX_LABEL_SHOWN = 120


class LabelError(Exception):
    """A load label that names no loadable file: `message` and `hint` are user-facing."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _shown(label: str) -> str:
    text = label if len(label) <= _MAX_LABEL_SHOWN else label[:_MAX_LABEL_SHOWN] + "..."
    return repr(text).replace("\\x00", "\\0")


def display_label(key: str, entry: str) -> str:
    """How a loaded file is named in a load chain: the entry as is, others as labels."""
    if key == entry or key.startswith(LIBRARY_PREFIX):
        return key
    return "//" + key


def resolve_label(label: str, files: Mapping[str, str], library: Mapping[str, str]) -> str:
    """The key in `files` or `library` that `label` names; LabelError when there is none."""
    if "\x00" in label:
        raise LabelError(f"load label {_shown(label)} contains a NUL byte")
    if "\\" in label:
        raise LabelError(
            f"load label {_shown(label)} contains a backslash",
            "labels use forward slashes, e.g. //lib/routes.star",
        )
    if label.startswith("@"):
        return _resolve_library(label, library)
    if label.startswith("//"):
        path = label[2:]
    elif label.startswith("/"):
        raise LabelError(
            f"load label {_shown(label)} is an absolute path; only files in the policy tree can be loaded",
            "name the file from the policy root, e.g. //lib/routes.star",
        )
    else:
        path = label
    if path.startswith("/"):
        raise LabelError(
            f"load label {_shown(label)} is an absolute path; only files in the policy tree can be loaded",
            "name the file from the policy root, e.g. //lib/routes.star",
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LabelError(
            f"load label {_shown(label)} uses `..`; labels are paths from the policy root and cannot leave it",
            "name the file from the policy root, e.g. //lib/routes.star",
        )
    key = "/".join(parts)
    if not key.endswith(".star"):
        raise LabelError(
            f"load label {_shown(label)} does not name a .star file", "only Starlark files (*.star) can be loaded"
        )
    if key not in files:
        raise LabelError(
            f"load label {_shown(label)}: no file {key} in the policy tree",
            "labels are paths from the policy root, e.g. //lib/routes.star",
        )
    return key


def _resolve_library(label: str, library: Mapping[str, str]) -> str:
    if not label.startswith(LIBRARY_PREFIX):
        repo = label.split("//", 1)[0]
        raise LabelError(
            f"load label {_shown(label)} names an unknown repository {_shown(repo)}",
            "only @starmesh// (the shipped library) and files of the policy tree can be loaded",
        )
    name = label[len(LIBRARY_PREFIX) :]
    if ".." in name.split("/") or name.startswith("/"):
        raise LabelError(f"load label {_shown(label)} does not name a file of the starmesh library")
    if not name.endswith(".star"):
        raise LabelError(
            f"load label {_shown(label)} does not name a .star file", "only Starlark files (*.star) can be loaded"
        )
    key = LIBRARY_PREFIX + name
    if key not in library:
        known = ", ".join(sorted(library)) or "none"
        raise LabelError(
            f"load label {_shown(label)}: the starmesh library has no file {name}", f"library files: {known}"
        )
    return key
