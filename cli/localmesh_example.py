"""An example mesh that `starmesh up` can run: a directory with `up.json`.

    EXAMPLE_DIR/
      up.json        {"mesh": "bookinfo",
                      "policies": "policies",                       the policy root
                      "entry": {"service": "productpage", "path": "/productpage"},
                      "apps": [{"service": "reviews", "version": "v2",
                                "script": "apps/reviews.py"}, ...],   one per app instance
                      "try": ["curl -s http://{entry}/api/v1/products/0", ...]}
      policies/      mesh.star, lib/*.star
      apps/*.py      started as  python SCRIPT --service S --version V
                                        --listen 127.0.0.1:PORT --outbound 127.0.0.1:PORT2
                     and printing `listening HOST:PORT` once they serve

`load_example` reads and checks all of it before anything is started or written, so a
typo costs nothing; every problem is a SetupError (exit 2) naming the file and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import msgspec

from starmesh.cli.localmesh_errors import SetupError

__all__ = ["MAX_INSTANCES", "AppInstance", "Entry", "Example", "load_example"]

MAX_INSTANCES = 64
"""At most this many app instances (each is two processes: the app and its sidecar)."""
_MAX_FILE_BYTES = 256 * 1024
_MAX_TRY_LINES = 32
_MAX_TRY_CHARS = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class _AppFile(msgspec.Struct, frozen=True):
    service: str
    version: str
    script: str


class _EntryFile(msgspec.Struct, frozen=True):
    service: str
    path: str = "/"


class _UpFile(msgspec.Struct, frozen=True):
    mesh: str
    entry: _EntryFile
    apps: list[_AppFile]
    policies: str = "policies"
    try_: list[str] = msgspec.field(default_factory=list, name="try")


@dataclass(frozen=True)
class AppInstance:
    """One app instance to run, with a sidecar in front of it."""

    service: str
    version: str
    script: Path
    """Absolute path of the app's script."""

    @property
    def name(self) -> str:
        """`reviews-v2`: names its sidecar's state dir and both log files."""
        return f"{self.service}-{self.version}"


@dataclass(frozen=True)
class Entry:
    """Where people come into the mesh: a service and the page to open."""

    service: str
    path: str


@dataclass(frozen=True)
class Example:
    """A checked `up.json` and the directory it lives in (paths absolute)."""

    root: Path
    given: str
    """EXAMPLE_DIR as the user gave it, for messages and the initial commit."""
    mesh: str
    policies: Path
    entry: Entry
    apps: tuple[AppInstance, ...]
    tries: tuple[str, ...]


def _inside(root: Path, value: str, field: str, where: Path) -> Path:
    """`root / value` for a relative path that stays inside `root`; SetupError otherwise."""
    relative = PurePosixPath(value)
    if not value or "\\" in value or "\x00" in value or relative.is_absolute() or ".." in relative.parts:
        raise SetupError(f"{where}: {field} {value!r} must be a path inside {root}, relative to it, without `..`")
    return root / relative


def _name(value: str, field: str, where: Path) -> str:
    if not _NAME.match(value):
        raise SetupError(
            f"{where}: {field} {value!r} must be 1-63 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        )
    return value


def _read(path: Path) -> _UpFile:
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SetupError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise SetupError(f"{path}: larger than {_MAX_FILE_BYTES // 1024} KiB; is it the right file?")
    try:
        return msgspec.json.decode(data, type=_UpFile)
    except msgspec.DecodeError as exc:
        raise SetupError(f"{path}: not a valid up.json: {exc}") from exc


def load_example(given: str) -> Example:
    """The example at `given` (a directory), checked; SetupError saying what is wrong."""
    root = Path(given).expanduser()
    if not root.exists():
        raise SetupError(f"example dir {given} does not exist (give a directory with up.json, e.g. examples/bookinfo)")
    if not root.is_dir():
        raise SetupError(f"{given} is not a directory (give the example's directory, the one with up.json)")
    root = root.resolve()
    up_json = root / "up.json"
    if not up_json.is_file():
        raise SetupError(f"no up.json in {root}: not an example `starmesh up` can run (try examples/bookinfo)")
    spec = _read(up_json)
    if not spec.mesh.strip():
        raise SetupError(f"{up_json}: mesh must not be empty")
    policies = _inside(root, spec.policies, "policies", up_json).resolve()
    if not policies.is_dir():
        raise SetupError(f"{up_json}: policies {spec.policies!r}: no such directory in {root}")
    if not (policies / "mesh.star").is_file():
        raise SetupError(f"no mesh.star in {policies}: the example's policy root needs one")
    if not spec.apps:
        raise SetupError(f"{up_json}: apps is empty: name at least one app instance to run")
    if len(spec.apps) > MAX_INSTANCES:
        raise SetupError(f"{up_json}: {len(spec.apps)} apps; `starmesh up` runs at most {MAX_INSTANCES} instances")
    apps: list[AppInstance] = []
    seen: set[tuple[str, str]] = set()
    for i, app in enumerate(spec.apps):
        field = f"apps[{i}]"
        key = (_name(app.service, f"{field}.service", up_json), _name(app.version, f"{field}.version", up_json))
        if key in seen:
            raise SetupError(f"{up_json}: {field}: {app.service} {app.version} is listed twice")
        seen.add(key)
        script = _inside(root, app.script, f"{field}.script", up_json)
        if not script.is_file():
            raise SetupError(f"{up_json}: {field}.script {app.script!r}: no such file in {root}")
        apps.append(AppInstance(app.service, app.version, script))
    entry = spec.entry
    if not any(app.service == entry.service for app in apps):
        raise SetupError(f"{up_json}: entry.service {entry.service!r} is not one of the apps' services")
    if not entry.path.startswith("/"):
        raise SetupError(f"{up_json}: entry.path {entry.path!r} must start with /")
    if len(spec.try_) > _MAX_TRY_LINES or any(len(line) > _MAX_TRY_CHARS for line in spec.try_):
        raise SetupError(f"{up_json}: try holds at most {_MAX_TRY_LINES} lines of {_MAX_TRY_CHARS} characters")
    return Example(
        root=root,
        given=given,
        mesh=spec.mesh,
        policies=policies,
        entry=Entry(entry.service, entry.path),
        apps=tuple(apps),
        tries=tuple(spec.try_),
    )
