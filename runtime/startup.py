"""What a proxy starts from: its `ProxyConfig`, the config files, last-known-good, the control plane.

    ProxyConfig ─┬─ --bundle FILE [--endpoints FILE]   apply_files: read, parse, Applier.apply
                 │     refused at start ─► last-known-good (its bundle digest checked on load)
                 └─ --control-plane URL... --trust FILE... [--ca-cert FILE [--join-token T]]
                       at start: workload_identity, whose certificate kept in the state dir
                       is loaded (workload.py; none and no join token: WorkloadError, exit 2),
                       last-known-good whose signed release verifies (restore.py)
                       then: control_plane_settings ─► the ControlPlaneClient (control.py)

`start_config` is the start-up apply of either form; it returns None when a config is
live, else why not (the proxy then runs not ready and says so). The `--bundle` form
applies the files again on SIGHUP (`reload_files`); a bad file changes nothing.

The `--bundle` form never imports the certificate, key and signature code (cryptography,
several megabytes of an idle proxy's memory): what only the control-plane or `--ca-cert`
form needs is imported where it is used.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starmesh.runtime.apply import Applier, ApplyResult
from starmesh.runtime.control_http import ControlLimits, ControlPlaneSettings, WorkloadLimits
from starmesh.runtime.endpoints import EndpointTable, parse_endpoints
from starmesh.runtime.errors import ConfigRejected
from starmesh.runtime.http.limits import HttpLimits
from starmesh.runtime.identity import load_or_create_proxy_id
from starmesh.runtime.lkg import load_state
from starmesh.runtime.restore import restore_last_known_good

if TYPE_CHECKING:  # keys and certificates (cryptography) are the control-plane form's
    from starmesh.bundle.keys import PublicKey
    from starmesh.runtime.workload import WorkloadIdentity

__all__ = [
    "ProxyConfig",
    "apply_files",
    "control_plane_settings",
    "reload_files",
    "start_config",
    "workload_identity",
]

log = logging.getLogger("starmesh.proxy")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """What `starmesh proxy` was asked to do (addresses are `HOST:PORT`, checked by the CLI).

    Exactly one form: `bundle` (local development), or `control_plane` URLs with the
    `trusted` release signing keys (`control_limits`: caps and timings, tests shrink them).
    With mesh certificates, `ca_cert` is the mesh root(s) as PEM (`--ca-cert`'s contents)
    and `join_token` asks for the first workload certificate (`workload_limits`: its timings)."""

    service: str
    version: str
    app: str
    inbound: str
    outbound: str
    admin: str
    state_dir: Path
    bundle: Path | None = None
    endpoints: Path | None = None
    control_plane: tuple[str, ...] = ()
    trusted: tuple[PublicKey, ...] = ()
    control_limits: ControlLimits = ControlLimits()
    ca_cert: bytes | None = None
    join_token: str | None = None
    workload_limits: WorkloadLimits = WorkloadLimits()
    grace_seconds: float = 10.0
    limits: HttpLimits = HttpLimits()
    access_log: str | None = None
    """`--access-log`: a file path, "-" (standard output) or "off"; None: STATE_DIR/access.log."""
    otlp_endpoint: str | None = None
    """`--otlp-endpoint`: push metrics (URL/v1/metrics) and traces (URL/v1/traces) over OTLP/HTTP; None: no push."""


def _read_files(config: ProxyConfig) -> tuple[bytes, EndpointTable | None]:
    """The --bundle bytes and the parsed --endpoints table; ConfigRejected saying which file."""
    assert config.bundle is not None
    try:
        data = config.bundle.read_bytes()
    except OSError as exc:
        raise ConfigRejected(
            f"cannot read bundle file {config.bundle}: {exc.strerror or exc}", reason="unreadable"
        ) from exc
    if config.endpoints is None:
        return data, None
    try:
        raw = config.endpoints.read_bytes()
    except OSError as exc:
        raise ConfigRejected(
            f"cannot read endpoints file {config.endpoints}: {exc.strerror or exc}", reason="unreadable"
        ) from exc
    return data, parse_endpoints(raw, str(config.endpoints))


async def apply_files(applier: Applier, config: ProxyConfig) -> ApplyResult:
    """Read and apply --bundle (and --endpoints); a bad file changes nothing."""
    try:
        data, endpoints = _read_files(config)
    except ConfigRejected as exc:
        return applier.reject("file", str(exc), reason=exc.reason)
    return await applier.apply(
        data,
        expected_digest=None,
        release_version=None,
        origin="file",
        endpoints=endpoints if endpoints is not None else {},
        endpoints_source=str(config.endpoints or "endpoints"),
    )


async def start_config(applier: Applier, config: ProxyConfig) -> str | None:
    """The start-up apply: None when a config is live, else why not.

    `--bundle`: the file, and when it is refused last-known-good; control-plane form:
    last-known-good whose release verifies."""
    state_dir = config.state_dir
    state = await asyncio.to_thread(load_state, state_dir)
    applier.high_water = state.high_water
    if config.bundle is None:
        why = await restore_last_known_good(applier, state, state_dir=state_dir, trusted=config.trusted)
        return None if why is None else f"no config yet: {why}"
    result = await apply_files(applier, config)
    if result.ok:
        return None
    file_error = f"bundle file {config.bundle} not applied: {result.error}"
    why = await restore_last_known_good(applier, state, state_dir=state_dir, trusted=None)
    if why is None:
        log.warning("started from last-known-good (%s)", file_error)
        return None
    return f"{file_error}; {why}"


async def reload_files(applier: Applier, config: ProxyConfig) -> ApplyResult | None:
    """SIGHUP: re-read the files and apply them; on failure the old table stays.

    In the control-plane form there is nothing to re-read (None)."""
    if config.bundle is None:
        log.info("SIGHUP: nothing to re-read in the control-plane form; the control plane drives the config")
        return None
    result = await apply_files(applier, config)
    if result.ok:
        log.info("SIGHUP: %s %s", "applied" if result.changed else "unchanged", result.digest)
    else:
        log.error("SIGHUP: the files were not applied (the reason is above); the current config stays")
    return result


def workload_identity(
    config: ProxyConfig, bundle_trust_domain: Callable[[], str | None]
) -> WorkloadIdentity | None:
    """The workload identity (`load` it at start); None without `--ca-cert` or in the `--bundle` form.

    WorkloadError when `--ca-cert` holds no certificate."""
    if config.ca_cert is None or config.bundle is not None:
        return None
    from starmesh.runtime.workload import WorkloadIdentity  # X.509 and EC keys: only with --ca-cert

    return WorkloadIdentity(
        service=config.service,
        state_dir=config.state_dir,
        ca_pem=config.ca_cert,
        join_token=config.join_token,
        bundle_trust_domain=bundle_trust_domain,
        limits=config.workload_limits,
    )


def control_plane_settings(
    config: ProxyConfig, *, tls: Callable[[], ssl.SSLContext] | None = None
) -> ControlPlaneSettings | None:
    """Who the proxy is to the control plane (its id kept in the state dir); None in the `--bundle` form.

    `tls`: the HTTPS context (the workload identity's). IdentityError when the proxy id cannot be kept."""
    if config.bundle is not None:
        return None
    proxy_id = load_or_create_proxy_id(config.state_dir, config.service, config.version)
    return ControlPlaneSettings(
        urls=config.control_plane,
        trusted=config.trusted,
        proxy_id=proxy_id,
        service=config.service,
        version=config.version,
        limits=config.control_limits,
        tls=tls,
    )
