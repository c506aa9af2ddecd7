"""`starmesh ca`: the mesh's certificate authority.

    starmesh ca init --trust-domain cluster.local --out ca/
        ca/ca.crt   PEM, the mesh root          -> control-plane --ca ca/, proxy --ca-cert ca/ca.crt
        ca/ca.key   PEM PKCS#8, mode 0600       -> read by the control plane only

The files come from `reconciler/ca.init_ca`, which checks the trust domain with the
compiler's rule for `mesh(trust_domain = ...)`, creates DIR if needed and writes each file
exclusively (an existing root is never replaced). A bad trust domain or an existing file
is bad input (exit 2). The command prints both paths, the trust domain and the root's
SHA-256 fingerprint (what `openssl x509 -fingerprint -sha256` shows), to compare when
handing ca.crt to proxies.
"""

from __future__ import annotations

from pathlib import Path

import click

from starmesh.cli.console import Consoles
from starmesh.cli.errors import InputError

__all__ = ["ca_group", "ca_init_command"]


@click.group("ca")
def ca_group() -> None:
    """The mesh CA: the root that signs every proxy's workload certificate (X.509-SVID).

    \b
    Examples:
      starmesh ca init --trust-domain cluster.local --out ca/
      starmesh control-plane --ca ca/ --join-token "$TOKEN" ...
      starmesh proxy --ca-cert ca/ca.crt --join-token "$TOKEN" ...
    """


@ca_group.command("init")
@click.option(
    "--trust-domain",
    required=True,
    metavar="TD",
    help="The mesh's trust domain (a lower-case DNS name, e.g. cluster.local); must match mesh(trust_domain = ...).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Directory for ca.crt and ca.key (created if missing).",
)
@click.pass_context
def ca_init_command(ctx: click.Context, trust_domain: str, out_dir: Path) -> None:
    """Create the mesh root: DIR/ca.crt (PEM) and DIR/ca.key (PEM PKCS#8, mode 0600).

    The root (ECDSA P-256, valid 10 years) signs the short-lived certificates the control
    plane issues to proxies, each naming spiffe://TD/service/NAME. Keep ca.key secret: it
    is for `starmesh control-plane --ca DIR` only. Give ca.crt to every proxy
    (--ca-cert). Existing files in DIR are never overwritten (exit 2).

    \b
    Examples:
      starmesh ca init --trust-domain cluster.local --out ca/
    """
    from cryptography.hazmat.primitives import hashes

    from starmesh.reconciler.ca import init_ca, load_ca
    from starmesh.reconciler.errors import CAError

    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    try:
        cert_path, key_path = init_ca(trust_domain, out_dir)
        fingerprint = load_ca(out_dir).certificate.fingerprint(hashes.SHA256())
    except CAError as exc:
        raise InputError(str(exc)) from exc
    consoles.out.print(f"certificate   {cert_path}  (give it to `starmesh proxy --ca-cert`)")
    consoles.out.print(f"private key   {key_path}  (mode 0600; for `starmesh control-plane --ca {out_dir}` only)")
    consoles.out.print(f"trust domain  {trust_domain}  (identities are spiffe://{trust_domain}/service/<name>)")
    consoles.out.print(f"sha256        {fingerprint.hex(':').upper()}")
