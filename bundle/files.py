"""Durable file replacement, shared by every stage that persists state.

`write_atomically` is DESIGN.md's "temp file, fsync, rename" (plus a directory fsync so
the rename itself survives a crash): a reader, or a process restarted after a crash at
any moment, sees the old file or the new one, never part of either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["TEMP_PREFIX", "fsync_directory", "read_bounded", "write_atomically", "write_new_file"]

TEMP_PREFIX = ".starmesh-"
"""Temp files start with this, so a cleanup pass can remove the ones a crash left behind."""


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data`: temp file in the same directory, fsync, rename, fsync the directory.

    Raises OSError (the directory must exist); the temp file is removed on failure."""
    directory = path.parent
    fd, temp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make renames in `directory` durable; a no-op where the file system cannot fsync one."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create `path` with `data` and `mode` (whatever the umask), fsynced; never overwrite.

    Raises OSError: FileExistsError when it exists (keys and CAs are never replaced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have narrowed or widened it
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it holds more than `limit` bytes. Raises OSError."""
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    return None if len(data) > limit else data
