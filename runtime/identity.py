"""The proxy id: who this proxy is to the control plane, kept across restarts.

    STATE_DIR/proxy-id      "reviews-v2-3f9a0c1d\\n"    <service>-<version>-<8 random hex>

The id is made once, the first time a proxy runs the control-plane form with a state
dir, and read back on every later start, so a restarted proxy is the same entry in the
control plane's `/v1/status` (its heartbeat, its ACKs) rather than a new one while the
old one goes stale. It is written with `write_atomically` (temp file, fsync, rename).

Ids match the control plane's `[A-Za-z0-9._-]{1,128}`: characters of the service or
version outside that set become `-`. A file that does not hold a valid id (truncated,
edited by hand) is replaced by a new id, with a warning: the control plane then sees a
new proxy and lets the old entry go stale, which is the honest outcome.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

from starmesh.bundle.files import write_atomically
from starmesh.runtime.errors import IdentityError

__all__ = ["PROXY_ID_FILE", "is_proxy_id", "load_or_create_proxy_id", "new_proxy_id"]

PROXY_ID_FILE = "proxy-id"

_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SUFFIX_LENGTH = 8
_MAX_FILE_BYTES = 1024

log = logging.getLogger("starmesh.proxy")


def is_proxy_id(text: str) -> bool:
    """Whether `text` is a valid proxy id (`[A-Za-z0-9._-]{1,128}`)."""
    return _ID.match(text) is not None


def new_proxy_id(service: str, version: str) -> str:
    """A fresh id: `<service>-<version>-<8 random hex>`, at most 128 characters."""
    prefix = _UNSAFE.sub("-", f"{service}-{version}")[: 128 - _SUFFIX_LENGTH - 1]
    return f"{prefix}-{secrets.token_hex(_SUFFIX_LENGTH // 2)}"


def load_or_create_proxy_id(state_dir: Path, service: str, version: str) -> str:
    """The id kept in `state_dir/proxy-id`, made and written on first use.

    Raises IdentityError when the file cannot be read or the new one cannot be written."""
    path = state_dir / PROXY_ID_FILE
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raw = None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the proxy id: {exc.strerror or exc}") from exc
    if raw is not None:
        text = raw.decode("utf-8", errors="replace").strip()
        if len(raw) <= _MAX_FILE_BYTES and is_proxy_id(text):
            return text
        log.warning("%s does not hold a valid proxy id (%r); making a new one", path, text[:64])
    proxy_id = new_proxy_id(service, version)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(path, (proxy_id + "\n").encode())
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write the proxy id: {exc.strerror or exc}") from exc
    return proxy_id
