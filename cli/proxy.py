"""`starmesh proxy`: run the sidecar proxy beside one app instance.

Two forms, exactly one of them:

    --control-plane URL [--control-plane URL ...] --trust FILE [--trust FILE ...]
        [--ca-cert FILE [--join-token T]]                 mesh certificates: https:// URLs
    --bundle FILE [--endpoints FILE]                      (local development)

Everything is checked before the proxy starts (exit 2 with one line saying what is
wrong): addresses, the URL shape (`http(s)://host:port`; `https://` with `--ca-cert`),
the trust files (PEM Ed25519 public keys), the mesh root (`--ca-cert`: PEM
certificates), the service name (a SPIFFE ID's, with `--ca-cert`), the join token's
characters. The join token may come from `STARMESH_JOIN_TOKEN` instead, which keeps it
out of the process list (without `--ca-cert` the variable is ignored). Whether a first
certificate is needed (none usable in the state dir, and no join token: exit 2) is the
proxy's check at start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from starmesh.cli.errors import InputError
from starmesh.cli.options import file_option, load_public_keys, make_state_dir, seconds_option

__all__ = ["proxy_command"]

_MAX_REPEATS = 16
"""At most this many --control-plane URLs and --trust keys (each release is checked against every key)."""
_MAX_JOIN_TOKEN = 1024


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


def _mesh_identity(
    ca_cert: Path | None, join_token: str | None, *, bundle: Path | None, urls: tuple[str, ...], service: str
) -> bytes | None:
    """`--ca-cert`'s PEM (None without it), after checking it and what goes with it; InputError."""
    if ca_cert is None:
        source = click.get_current_context().get_parameter_source("join_token")
        if join_token is not None and source is not click.core.ParameterSource.ENVIRONMENT:
            raise InputError("--join-token goes with --ca-cert FILE (the mesh root): give both, or neither")
        return None
    if bundle is not None:
        raise InputError("--ca-cert goes with --control-plane: in the --bundle form links are plaintext")
    plain = [url for url in urls if not url.startswith("https://")]
    if plain:
        raise InputError(f"--control-plane {plain[0]}: with --ca-cert the control plane is reached over https://")
    if join_token is not None:
        if not 0 < len(join_token) <= _MAX_JOIN_TOKEN or not all("!" <= ch <= "~" for ch in join_token):
            raise InputError(f"--join-token: give 1 to {_MAX_JOIN_TOKEN} visible ASCII characters, no spaces")
    from starmesh.bundle.errors import IdentityError
    from starmesh.bundle.identity import check_service_name, load_certificates

    try:
        check_service_name(service)
    except IdentityError as exc:
        raise InputError(f"--service: with --ca-cert it names a SPIFFE ID: {exc}") from None
    try:
        with open(ca_cert, "rb") as file:
            pem = file.read(1024 * 1024)
        load_certificates(pem)
    except OSError as exc:
        raise InputError(f"--ca-cert {ca_cert}: cannot read it: {exc.strerror or exc}") from None
    except IdentityError as exc:
        raise InputError(f"--ca-cert {ca_cert}: {exc} (give the mesh root, ca.crt from `starmesh ca init`)") from None
    return pem


def _access_log(value: str | None) -> None:
    """`--access-log`: "-", "off", or a file whose directory exists; InputError saying what is wrong."""
    if value is None or value in ("-", "off"):
        return
    path = Path(value)
    if not value.strip() or path.is_dir():
        raise InputError(f"--access-log {value!r}: give a file path, - (standard output) or off")
    if not path.absolute().parent.is_dir():
        raise InputError(f"--access-log {value}: the directory {path.absolute().parent} does not exist")


def _otlp_endpoint(value: str | None) -> str | None:
    """`--otlp-endpoint`: an http(s) base URL (`/v1/metrics`, `/v1/traces` are added); InputError."""
    if value is None or not value.strip():
        return None
    where = f"--otlp-endpoint {value!r}"
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError as exc:
        raise InputError(f"{where}: not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise InputError(f"{where}: give an http:// or https:// URL with a host (e.g. http://127.0.0.1:4318)")
    if parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        raise InputError(f"{where}: give only scheme, host, port and path (no query, fragment or user)")
    return value.strip().rstrip("/")


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
@file_option(
    "--trust",
    "With --control-plane: a trusted release signing key (PEM signing.pub); repeat while rotating keys.",
    multiple=True,
)
@file_option(
    "--ca-cert", "With --control-plane: the mesh root (ca.crt); the proxy gets a workload certificate and uses mTLS."
)
@click.option(
    "--join-token",
    envvar="STARMESH_JOIN_TOKEN",
    metavar="T",
    help="With --ca-cert: the mesh's join token, for the first certificate (or env STARMESH_JOIN_TOKEN).",
)
@click.option(
    "--max-request-body",
    type=click.IntRange(min=1),
    metavar="BYTES",
    help="Answer 413 to request bodies larger than this (default: no limit; bodies are streamed).",
)
@seconds_option(
    "--header-timeout",
    0.001,
    3600,
    "Answer 408 and close when a request head takes longer than this (slowloris).",
    default=10.0,
)
@click.option(
    "--access-log",
    metavar="PATH|-|off",
    help="JSON lines, one per request (default: STATE_DIR/access.log, rotated at 10 MiB); - for stdout, off for none.",
)
@click.option(
    "--otlp-endpoint",
    envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
    metavar="URL",
    help="Push metrics and traces over OTLP/HTTP to URL/v1/metrics and URL/v1/traces "
    "(or env OTEL_EXPORTER_OTLP_ENDPOINT; default: no push, /metrics only).",
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
    ca_cert: Path | None,
    join_token: str | None,
    max_request_body: int | None,
    header_timeout: float,
    access_log: str | None,
    otlp_endpoint: str | None,
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

    With --ca-cert (the mesh root) the control plane is reached over https://
    and the proxy has a workload certificate (spiffe://<td>/service/SERVICE):
    the first one is asked for with --join-token, later ones are renewed at
    half-life; both are kept in --state-dir (workload.key, workload.crt, 0600),
    so a restart works while the control plane is down and the certificate
    is valid. With neither a usable certificate nor --join-token it exits 2.

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
        --state-dir .starmesh/productpage \\
        --control-plane https://127.0.0.1:8400 --trust keys/signing.pub \\
        --ca-cert ca/ca.crt --join-token "$(cat join-token)"
      starmesh proxy --service productpage --version v1 --app 127.0.0.1:9080 \\
        --inbound 127.0.0.1:15006 --outbound 127.0.0.1:15001 --admin 127.0.0.1:15000 \\
        --state-dir .starmesh/productpage --bundle bundle.json --endpoints endpoints.json
    """
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
    ca_pem = _mesh_identity(ca_cert, join_token, bundle=bundle, urls=urls, service=service)
    trusted = load_public_keys(trust, where="--trust:") if trust else ()  # no key code in the --bundle form
    _access_log(access_log)
    otlp = _otlp_endpoint(otlp_endpoint)
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
        ca_cert=ca_pem,
        join_token=join_token if ca_pem is not None else None,
        limits=HttpLimits(max_request_body=max_request_body, header_timeout=header_timeout),
        access_log=access_log,
        otlp_endpoint=otlp,
    )
    sys.exit(run_proxy(config))
