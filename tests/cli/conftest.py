"""Shared helpers for the CLI tests: output snapshots under tests/cli/snapshots/."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _assert_snapshot(name: str, actual: str) -> None:
    """Compare with tests/cli/snapshots/NAME; STARMESH_UPDATE_SNAPSHOTS=1 rewrites it."""
    path = SNAPSHOTS / name
    if os.environ.get("STARMESH_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"missing snapshot {path}: run with STARMESH_UPDATE_SNAPSHOTS=1 to create it"
    assert actual == path.read_text(encoding="utf-8"), f"output differs from {path}"


@pytest.fixture
def assert_snapshot() -> Callable[[str, str], None]:
    """The snapshot comparison (a fixture: importlib mode cannot import conftest)."""
    return _assert_snapshot
