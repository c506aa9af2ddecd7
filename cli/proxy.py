"""`starmesh proxy`: run the sidecar proxy beside one app instance.

Two forms, exactly one of them:

    --control-plane URL [--control-plane URL ...] --trust FILE [--trust FILE ...]
    --bundle FILE [--endpoints FILE]                      (local development)

Everything is checked before the proxy starts (exit 2 with one line saying what is
wrong): addresses, the URL shape (`http(s)://host:port`), the trust files (PEM Ed25519
public keys). `--ca-cert` and `--join-token` come with the security issue (5).
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from starmesh.cli.compile import InputError
from starmesh.cli.options import load_public_keys, make_state_dir

__all__ = ["proxy_command"]

_MAX_REPEATS = 16
"""At most this many --control-plane URLs and --trust keys (each release is checked against every key)."""

SECURITY_LATER = "{option} comes with the security issue (5: mesh certificates and join tokens); leave it out for now"


def _address(param: str, value: str, *, listener: bool) -> str:
    from starmesh.runtime.endpoints import parse_address

    try:
        parse_address(value, allow_port_zero=listener)
    except ValueError as exc:
        raise InputError(f"{param}: {exc}") from None
    return value


def _control_plane_url(value: str) -> str:
    """`http(s)://host:port` (a trailing `/` is dropped); InputError saying what is wrong."""
    where = f"--control-plane {value!r}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"{where}: not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InputError(f"{where}: must start with http:// or https:// (e.g. http://127.0.0.1:8400)")
    if not parts.hostname:
        raise InputError(f"{where}: has no host (e.g. http://127.0.0.1:8400)")
    if port is None or port == 0:
        raise InputError(f"{where}: give the port, from 1 to 65535 (e.g. http://127.0.0.1:8400)")
    if parts.username is not None or parts.password is not None:
        raise InputError(f"{where}: must not carry a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(f"{where}: give only scheme, host and port (the API paths are fixed: /v1/...)")
    return f"{parts.scheme}://{parts.netloc}"


@click.command("proxy")
@click.option("--service", required=True, metavar="S", help="The local app's service name.")
@click.option("--version", "version", required=True, metavar="V", help="The local app's version (e.g. v1).")
@click.option("--app", required=True, metavar="HOST:PORT", help="Where the local app listens.")
@click.option("--inbound", required=True, metavar="HOST:PORT", help="Listener for peers (port 0: any free port).")
@click.option("--outbound", required=True, metavar="HOST:PORT", help="Listener for the local app's calls.")
@click.option("--admin", required=True, metavar="HOST:PORT", help="/healthz /readyz /config /explain /metrics.")
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Where last-known-good is kept (created if missing).",
)
@click.option(
    "--bundle",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Local development: apply this bundle (SIGHUP re-reads it).",
)
@click.option(
    "--endpoints",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help='With --bundle: JSON {"service": {"version": ["host:port", ...]}}.',
)
@click.option(
    "--control-plane",
    multiple=True,
    metavar="URL",
    help="The control plane, http(s)://host:port; repeat for failover across replicas.",
)
@click.option(
    "--trust",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="With --control-plane: a trusted release signing key (PEM signing.pub); repeat while rotating keys.",
)
@click.option("--ca-cert", metavar="FILE", help="The mesh root certificate (comes with the security issue, 5).")
@click.option("--join-token", metavar="T", help="The mesh's join token (comes with the security issue, 5).")
@click.option(
    "--max-request-body",
    type=click.IntRange(min=1),
    metavar="BYTES",
    help="Answer 413 to request bodies larger than this (default: no limit; bodies are streamed).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.001, max=3600),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Answer 408 and close when a request head takes longer than this (slowloris).",
)
def proxy_command(
    service: str,
    version: str,
    app: str,
    inbound: str,
    outbound: str,
    admin: str,
    state_dir: Path,
    bundle: Path | None,
    endpoints: Path | None,
    control_plane: tuple[str, ...],
    trust: tuple[Path, ...],
    ca_cert: str | None,
    join_token: str | None,
    max_request_body: int | None,
    header_timeout: float,
) -> None:
    """Run the sidecar proxy for one instance of SERVICE at VERSION.

    The outbound listener takes the app's calls (Host: <service>, or absolute-form
    URLs as an HTTP_PROXY); the inbound listener takes peers' calls and forwards
    them to --app; the admin listener answers /healthz, /readyz, /config, /explain
    and /metrics.

    Give exactly one of --control-plane or --bundle.

    In the control-plane form the proxy long-polls the control plane for signed
    releases, verifies each against the --trust keys, fetches and applies its
    bundle and reports an ACK or NACK; it registers its inbound address and
    follows the endpoint table. It starts from the last-known-good config in
    --state-dir (when its signed release verifies), so it serves while the
    control plane is down; with several --control-plane URLs it fails over.

    In the --bundle form (local development) the proxy applies FILE at start and
    again on SIGHUP; an invalid file keeps the config it has (at start: the
    last-known-good in --state-dir, else it runs not ready and says why). Links
    are plaintext.

    On start it prints, on stdout, the plaintext notice, one line per listener with
    the bound address (port 0 picks a free port), then `ready sha256:<hex>` or
    `not ready: <why>`; in the control-plane form also `applied release N
    sha256:<hex>` after every apply from the control plane:

    \b
      starmesh proxy: links are plaintext (local development: --bundle without certificates)
      outbound 127.0.0.1:15001
      inbound 127.0.0.1:15006
      admin 127.0.0.1:15000
      ready sha256:...

    SIGTERM or SIGINT: stop accepting, finish in-flight requests (bounded), exit 0.

    \b
    Examples:
      starmesh proxy --service productpage --version v1 --app 127.0.0.1:9080 \\
        --inbound 127.0.0.1:15006 --outbound 127.0.0.1:15001 --admin 127.0.0.1:15000 \\
        --state-dir .starmesh/productpage \\
        --control-plane http://127.0.0.1:8400 --trust keys/signing.pub
      starmesh proxy --service productpage --version v1 --app 127.0.0.1:9080 \\
        --inbound 127.0.0.1:15006 --outbound 127.0.0.1:15001 --admin 127.0.0.1:15000 \\
        --state-dir .starmesh/productpage --bundle bundle.json --endpoints endpoints.json
    """
    for option, given in (("--ca-cert", ca_cert), ("--join-token", join_token)):
        if given is not None:
            raise InputError(SECURITY_LATER.format(option=option))
    if bundle is not None and control_plane:
        raise InputError("give exactly one of --bundle FILE (local development) or --control-plane URL, not both")
    if bundle is None and not control_plane:
        raise InputError("give --control-plane URL (with --trust FILE), or --bundle FILE for local development")
    if control_plane and not trust:
        raise InputError("--control-plane needs --trust FILE: the control plane's release signing key (signing.pub)")
    if bundle is not None and trust:
        raise InputError("--trust goes with --control-plane (a --bundle file is not signed)")
    if control_plane and endpoints is not None:
        raise InputError("--endpoints goes with --bundle; in the control-plane form the control plane serves them")
    for name, value in (("--service", service), ("--version", version)):
        if not value.strip():
            raise InputError(f"{name} must not be empty")
    _address("--app", app, listener=False)
    for name, value in (("--inbound", inbound), ("--outbound", outbound), ("--admin", admin)):
        _address(name, value, listener=True)
    for option, count in (("--control-plane", len(control_plane)), ("--trust", len(trust))):
        if count > _MAX_REPEATS:
            raise InputError(f"{option} is given {count} times; at most {_MAX_REPEATS}")
    urls = tuple(dict.fromkeys(_control_plane_url(url) for url in control_plane))
    trusted = load_public_keys(trust, where="--trust:")
    make_state_dir(state_dir)

    from starmesh.runtime.http.limits import HttpLimits
    from starmesh.runtime.proxy import ProxyConfig, run_proxy

    config = ProxyConfig(
        service=service,
        version=version,
        app=app,
        inbound=inbound,
        outbound=outbound,
        admin=admin,
        state_dir=state_dir,
        bundle=bundle,
        endpoints=endpoints,
        control_plane=urls,
        trusted=trusted,
        limits=HttpLimits(max_request_body=max_request_body, header_timeout=header_timeout),
    )
    sys.exit(run_proxy(config))
