"""`starmesh keygen`: make the Ed25519 key pair the control plane signs releases with.

    starmesh keygen --out keys/
        keys/signing.key   PEM PKCS#8, mode 0600   -> starmesh control-plane --key
        keys/signing.pub   PEM SPKI                -> starmesh proxy --trust, starmesh verify --key

The key files come from `bundle/keys.generate_keypair`, which creates the directory if
needed, writes each file exclusively (O_EXCL, so an existing key is never overwritten,
not even in a race) and fsyncs it. An existing key is bad input (exit 2): replacing it
would make every proxy that trusts the old public key reject the next release. The
command prints both paths and the key id (hex sha256 of the raw public key, the `keyid`
every DSSE signature made with it carries).
"""

from __future__ import annotations

from pathlib import Path

import click

from starmesh.cli.console import Consoles
from starmesh.cli.errors import InputError

__all__ = ["keygen_command"]


@click.command("keygen")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Directory for signing.key and signing.pub (created if missing).",
)
@click.pass_context
def keygen_command(ctx: click.Context, out_dir: Path) -> None:
    """Generate a release signing key pair: DIR/signing.key and DIR/signing.pub.

    signing.key (PEM PKCS#8, mode 0600) is the control plane's private key; keep it
    secret. signing.pub (PEM SubjectPublicKeyInfo) is what proxies trust (--trust) and
    what `starmesh verify --key` checks against. An existing key in DIR is never
    overwritten (exit 2): rotate by generating a new pair in another directory, trusting
    both public keys on the proxies, then switching the control plane's --key.

    \b
    Examples:
      starmesh keygen --out keys/
      starmesh control-plane --key keys/signing.key ...
      starmesh proxy --trust keys/signing.pub ...
    """
    from starmesh.bundle.errors import BundleError
    from starmesh.bundle.keys import generate_keypair, keyid_of, load_public_key

    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    try:
        private_path, public_path = generate_keypair(out_dir)
        keyid = keyid_of(load_public_key(public_path))
    except BundleError as exc:
        raise InputError(str(exc)) from exc
    consoles.out.print(f"private key  {private_path}  (mode 0600; give it to `starmesh control-plane --key`)")
    consoles.out.print(f"public key   {public_path}  (give it to `starmesh proxy --trust` and `starmesh verify --key`)")
    consoles.out.print(f"keyid        {keyid}")
