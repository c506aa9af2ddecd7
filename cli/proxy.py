"""`starmesh proxy`: run the sidecar proxy beside one app instance."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from starmesh.cli.compile import InputError

__all__ = ["proxy_command"]

CONTROL_PLANE_LATER = "the control-plane form comes with the reconciler (issue 4); use --bundle FILE"


def _address(param: str, value: str, *, listener: bool) -> str:
    from starmesh.runtime.endpoints import parse_address

    try:
        parse_address(value, allow_port_zero=listener)
    except ValueError as exc:
        raise InputError(f"{param}: {exc}") from None
    return value


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
@click.option("--control-plane", multiple=True, metavar="URL", help="Control plane URL (issue 4).")
@click.option("--trust", multiple=True, metavar="FILE", help="Trusted release signing key (issue 4).")
@click.option("--ca-cert", metavar="FILE", help="The mesh root certificate (issue 4).")
@click.option("--join-token", metavar="T", help="The mesh's join token (issue 4).")
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
    trust: tuple[str, ...],
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

    In the --bundle form (local development) the proxy applies FILE at start and
    again on SIGHUP; an invalid file keeps the config it has (at start: the
    last-known-good in --state-dir, else it runs not ready and says why). Links
    are plaintext.

    On start it prints, on stdout, the plaintext notice, one line per listener with
    the bound address (port 0 picks a free port), then `ready sha256:<hex>` or
    `not ready: <why>`:

    \b
      starmesh proxy: links are plaintext (local development: --bundle without certificates)
      outbound 127.0.0.1:15001
      inbound 127.0.0.1:15006
      admin 127.0.0.1:15000
      ready sha256:...

    SIGTERM or SIGINT: stop accepting, finish in-flight requests (bounded), exit 0.

    \b
    Example:
      starmesh proxy --service productpage --version v1 --app 127.0.0.1:9080 \\
        --inbound 127.0.0.1:15006 --outbound 127.0.0.1:15001 --admin 127.0.0.1:15000 \\
        --state-dir .starmesh/productpage --bundle bundle.json --endpoints endpoints.json
    """
    if control_plane or trust or ca_cert or join_token:
        raise InputError(CONTROL_PLANE_LATER)
    if bundle is None:
        raise InputError("give --bundle FILE (local development; the control-plane form comes with issue 4)")
    for name, value in (("--service", service), ("--version", version)):
        if not value.strip():
            raise InputError(f"{name} must not be empty")
    _address("--app", app, listener=False)
    for name, value in (("--inbound", inbound), ("--outbound", outbound), ("--admin", admin)):
        _address(name, value, listener=True)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--state-dir {state_dir}: cannot create it: {exc.strerror or exc}") from exc

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
        limits=HttpLimits(max_request_body=max_request_body, header_timeout=header_timeout),
    )
    sys.exit(run_proxy(config))
