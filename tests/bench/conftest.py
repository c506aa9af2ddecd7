"""What the bench smoke tests share: finding processes a bench left behind.

    running_with(text)   command lines of live processes mentioning `text` (a bench's
                         temp-dir prefix: everything it starts runs from there)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def _running_with(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.fixture
def running_with() -> Callable[[str], list[str]]:
    """`running_with(text)`: the command lines of live processes that mention `text`."""
    return _running_with
