"""PolicySource: the policy files at one commit (or one directory), read once.

Evaluation never touches the file system or Git: everything it may load is in
`PolicySource.files`, keyed by path relative to the policy root ("mesh.star",
"lib/routes.star"). The shipped library is keyed "@starmesh//NAME.star".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["PolicySource"]


@dataclass(frozen=True)
class PolicySource:
    """The policy tree to evaluate: files by root-relative path, the entry file, the commit."""

    files: Mapping[str, str]
    entry: str = "mesh.star"
    commit: str | None = None
    library: Mapping[str, str] = field(default_factory=dict)
