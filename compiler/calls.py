"""What evaluating a policy produces: the builtin calls it made, with where they were made.

Evaluation (compiler/evaluate.py) runs untrusted Starlark in a bounded worker and
records every builtin call; it checks nothing about arguments. The IR builder
(compiler/build.py) turns the recorded calls into a Spec and findings.

Values in `args`/`kwargs` are plain data (str, int, float, bool, None, list, dict with
string keys) or nested `Call`s: `service(retries = retries(attempts = 3))` records the
`retries` call inside the `service` call's kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starmesh.bundle.spec import SourceLocation

__all__ = ["Call", "Evaluation"]


@dataclass(frozen=True, eq=False)
class Call:
    """One builtin call. `location` is the innermost frame inside the policy root (a
    call made by a `@starmesh//` macro is reported where the user called the macro);
    `via` names that macro's chain, outermost first, e.g. ("canary",)."""

    builtin: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    location: SourceLocation
    via: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """The declarations (calls of `declares` builtins) in the order they were made."""

    declarations: tuple[Call, ...]
    files: tuple[str, ...]
    """Every policy file that was loaded, entry first (root-relative; library as @starmesh//)."""
