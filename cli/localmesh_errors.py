"""What can go wrong while `starmesh up` brings a local mesh up, as one exception tree.

    LocalMeshError                 the root: every failure of the local-mesh modules
     ├── SetupError                bad input or a state dir that cannot be used: exit 2
     │    └── AlreadyRunning       another `starmesh up` holds STATE/up.lock
     └── StartFailed               a part of the mesh did not come up: exit 1

The messages say what is wrong, where (a file, a child's log) and what to do; the
command (cli/up.py) prints them as they are and maps the class to the exit code.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AlreadyRunning", "LocalMeshError", "SetupError", "StartFailed"]


class LocalMeshError(Exception):
    """Root of the local-mesh errors; `exit_code` is what `starmesh up` exits with."""

    exit_code = 1


class SetupError(LocalMeshError):
    """The example dir, the state dir or the tools `up` needs are not usable (exit 2)."""

    exit_code = 2


class AlreadyRunning(SetupError):
    """Another `starmesh up` holds the state dir's lock."""

    def __init__(self, pid: int | None, state_dir: Path) -> None:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"starmesh up is already running ({who}, state in {state_dir}); "
            "stop it with Ctrl-C in its terminal or use --state-dir"
        )
        self.pid = pid
        self.state_dir = state_dir


class StartFailed(LocalMeshError):
    """A child did not start, the control plane is not ready, or proxies did not sync (exit 1)."""

    exit_code = 1
