"""`starmesh control-plane`: follow a policy branch, sign releases, serve proxies."""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.parse
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import click

from starmesh.cli.compile import ENTRY_HELP
from starmesh.cli.errors import InputError
from starmesh.cli.options import file_option, make_state_dir, seconds_option

__all__ = ["control_plane_command", "parse_ttl"]

_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_TTL = re.compile(r"^([0-9]{1,9})(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MIN_TTL = timedelta(seconds=10)
_MAX_TTL = timedelta(days=365)


def parse_ttl(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `90s` as a timedelta; ValueError saying why otherwise."""
    found = _TTL.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not a duration like 7d, 12h, 30m or 90s")
    ttl = timedelta(seconds=int(found.group(1)) * _UNIT_SECONDS[found.group(2)])
    if not _MIN_TTL <= ttl <= _MAX_TTL:
        raise ValueError(f"{text!r} is outside 10s..365d")
    return ttl


def _relative(option: str, value: str) -> str:
    path = PurePosixPath(value)
    if "\\" in value or "\x00" in value or path.is_absolute() or ".." in path.parts:
        raise InputError(f"{option} {value!r} must be a path inside the repository, relative to it, without `..`")
    return value


def _check_repo(repo: str) -> None:
    from starmesh.reconciler.watch import is_remote

    if not repo.strip():
        raise InputError("--repo must not be empty")
    if is_remote(repo):
        scheme = repo.partition("://")[0] if "://" in repo else "ssh"
        if scheme not in ("file", "http", "https", "ssh", "git"):
            raise InputError(f"--repo {repo}: unsupported URL scheme {scheme!r} (file, http, https, ssh or git)")
        return
    path = Path(repo)
    if not path.is_dir():
        raise InputError(f"--repo {repo}: no such directory (give a Git repository's path or URL)")
    import git

    try:
        git.Repo(str(path)).close()
    except (git.exc.InvalidGitRepositoryError, git.exc.NoSuchPathError):
        raise InputError(f"--repo {repo}: not a Git repository (run `git init` there, or give its URL)") from None


def _check_key(key: Path) -> None:
    from starmesh.bundle.errors import BundleError
    from starmesh.bundle.keys import load_private_key

    if not key.exists():
        raise InputError(f"--key {key}: no such file (create a signing key with `starmesh keygen --out DIR`)")
    try:
        load_private_key(key)
    except BundleError as exc:
        raise InputError(f"--key: {exc}") from exc


def _check_identity(ca: Path | None, join_token: str | None, cert_lifetime: str | None) -> timedelta:
    """`--ca`, `--join-token` and `--cert-lifetime` checked; the certificates' lifetime."""
    from starmesh.reconciler.certificates import DEFAULT_CERT_LIFETIME, check_join_token

    if ca is None and join_token is None:
        if cert_lifetime is not None:
            raise InputError("--cert-lifetime needs --ca DIR and --join-token (it is the lifetime of the certificates the CA issues)")
        return DEFAULT_CERT_LIFETIME
    if join_token is None:
        raise InputError("--ca needs --join-token TOKEN: proxies present the token to get their first certificate")
    if ca is None:
        raise InputError(
            "--join-token needs --ca DIR: the mesh CA that issues certificates (create one with "
            "`starmesh ca init --trust-domain TD --out DIR`)"
        )
    from starmesh.reconciler.ca import load_ca
    from starmesh.reconciler.errors import CAError

    try:
        check_join_token(join_token)
    except ValueError as exc:
        raise InputError(f"--join-token {exc}") from None
    lifetime = DEFAULT_CERT_LIFETIME
    if cert_lifetime is not None:
        try:
            lifetime = parse_ttl(cert_lifetime)
        except ValueError as exc:
            raise InputError(f"--cert-lifetime: {exc}") from None
    try:
        load_ca(ca)
    except CAError as exc:
        raise InputError(f"--ca: {exc}") from exc
    return lifetime


@click.command("control-plane")
@click.option("--repo", required=True, metavar="PATH_OR_URL", help="The policy repository: a local path or a Git URL.")
@click.option("--branch", default="main", show_default=True, metavar="NAME", help="The branch to follow.")
@file_option("--key", "Ed25519 signing key, PEM PKCS#8 (`starmesh keygen`).", required=True)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Bundles, releases, versions and a URL's mirror (created if missing).",
)
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address of the proxy API (port 0: any free port).")
@click.option("--subdir", default="", metavar="DIR", help="The policy root inside the repository.")
@click.option("--entry", default="mesh.star", show_default=True, metavar="FILE", help=ENTRY_HELP)
@seconds_option(
    "--poll-interval",
    0.1,
    3600,
    "Seconds between reads of the branch [default: 10 for a local repo (a safety net: "
    "ref changes are watched), 15 for a URL (fetched; failures back off up to 300)].",
)
@seconds_option(
    "--proxy-ttl",
    1,
    86400,
    "A proxy without a heartbeat for this long is stale (heartbeats every third of it).",
    default=30.0,
)
@click.option(
    "--release-ttl",
    default="7d",
    show_default=True,
    metavar="DURATION",
    help="How long a release is valid (7d, 12h, 30m, 90s); re-issued at half life.",
)
@click.option(
    "--ca",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="The mesh CA (ca.crt, ca.key from `starmesh ca init`): serve HTTPS with a certificate "
    "from it and issue proxies their certificates. Needs --join-token.",
)
@click.option(
    "--join-token",
    metavar="TOKEN",
    envvar="STARMESH_JOIN_TOKEN",
    help="The mesh's join token (at least 16 characters): a proxy presents it to get its first "
    "certificate. Needs --ca. Also read from STARMESH_JOIN_TOKEN (keeps it out of `ps`).",
)
@click.option(
    "--cert-lifetime",
    metavar="DURATION",
    help="How long a proxy certificate is valid (24h, 90m, 7d); proxies renew at half life [default: 24h]. Needs --ca.",
)
@click.option(
    "--store",
    metavar="etcd://HOST:PORT[,HOST:PORT...][/PREFIX]",
    help="Keep the state in etcd rather than --state-dir, so several replicas can run: one leads "
    "(an etcd lease) and compiles, signs and rolls out; all serve proxies. See docs/ha.md.",
)
@click.option(
    "--replica-id",
    metavar="ID",
    envvar="STARMESH_REPLICA_ID",
    help="This replica's name among the others (1-64 of letters, digits, '.', '_', '-') "
    "[default: the host name]. Needs --store. Also read from STARMESH_REPLICA_ID.",
)
@click.option(
    "--advertise-url",
    metavar="URL",
    help="Where the other replicas reach this one (followers forward rollbacks to the leader) "
    "[default: http(s)://the bound --listen address]. Needs --store.",
)
@seconds_option(
    "--leader-ttl",
    1.0,
    300.0,
    "The leader's etcd lease: a dead leader is replaced within about this long. Needs --store.",
    default=10.0,
)
@file_option(
    "--store-ca",
    "PEM CA certificate(s) that signed etcd's server certificates: reach every etcd member "
    "over HTTPS and check it against them. Needs --store.",
)
@file_option("--store-cert", "PEM client certificate for etcd's --client-cert-auth (with --store-key). Needs --store.")
@file_option("--store-key", "The PEM private key of --store-cert (unencrypted). Needs --store.")
def control_plane_command(
    repo: str,
    branch: str,
    key: Path,
    state_dir: Path,
    listen: str,
    subdir: str,
    entry: str,
    poll_interval: float | None,
    proxy_ttl: float,
    release_ttl: str,
    ca: Path | None,
    join_token: str | None,
    cert_lifetime: str | None,
    store: str | None,
    replica_id: str | None,
    advertise_url: str | None,
    leader_ttl: float,
    store_ca: Path | None,
    store_cert: Path | None,
    store_key: Path | None,
) -> None:
    """Follow BRANCH of a policy repository and serve signed releases to proxies.

    Each new commit is compiled; a commit with errors or failing golden requests is
    refused (the last good release stays; the diagnostics are in /v1/status), and a
    commit whose bundle is the released one issues nothing. Otherwise the bundle is
    stored by digest and released as the next version, signed with --key (a DSSE
    envelope, Ed25519), and rolled out as the policy's rollout() says. Versions only
    ever increase, across restarts too. Rapid commits coalesce to the newest.

    A local repository's refs are watched; a URL is mirrored into --state-dir and
    fetched every --poll-interval.

    It prints, on stdout, the bound address and then whether it is ready:

    \b
      listening 127.0.0.1:8080
      ready release 1 sha256:...        (or `not ready: <why>`, then `ready ...` later)

    With --ca DIR and --join-token TOKEN the API is HTTPS, with a server certificate
    from the mesh CA for the --listen host (proxies and `starmesh status` trust
    DIR/ca.crt via --ca-cert); proxies get their certificates from POST
    /v1/certificates with the join token and renew them with their own certificate,
    and the proxy routes refuse callers without one. /healthz, /readyz, /v1/status and
    /v1/rollback stay open: keep --listen on loopback or a trusted network.

    SIGTERM or SIGINT: stop and exit 0.

    \b
    Example:
      starmesh keygen --out keys
      starmesh control-plane --repo . --branch main --key keys/signing.key \\
        --state-dir .starmesh/control-plane --listen 127.0.0.1:8080

    \b
    With mesh identity (HTTPS, proxy certificates):
      starmesh ca init --trust-domain cluster.local --out ca
      starmesh control-plane ... --ca ca --join-token "$(cat join-token)"
    """
    replica = _check_replication(store, replica_id, advertise_url, leader_ttl)
    if replica:
        replica.update(_check_store_tls(store_ca, store_cert, store_key))
    else:
        _check_store_tls_needs_store(store_ca, store_cert, store_key)
    from starmesh.reconciler.watch import check_branch
    from starmesh.runtime.endpoints import parse_address

    try:
        check_branch(branch)
    except ValueError as exc:
        raise InputError(f"--branch: {exc}") from None
    try:
        parse_address(listen, allow_port_zero=True)
    except ValueError as exc:
        raise InputError(f"--listen: {exc}") from None
    try:
        ttl = parse_ttl(release_ttl)
    except ValueError as exc:
        raise InputError(f"--release-ttl: {exc}") from None
    _relative("--subdir", subdir)
    if not entry.strip():
        raise InputError("--entry must not be empty")
    _relative("--entry", entry)
    lifetime = _check_identity(ca, join_token, cert_lifetime)
    _check_repo(repo)
    _check_key(key)
    make_state_dir(state_dir)
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise InputError(f"--state-dir {state_dir}: not writable (give a directory this user can write)")

    from starmesh.reconciler.service import ControlPlaneConfig, run_control_plane

    config = ControlPlaneConfig(
        repo=repo,
        key=key,
        state_dir=state_dir,
        listen=listen,
        branch=branch,
        subdir=subdir,
        entry=entry,
        poll_interval=poll_interval,
        proxy_ttl=proxy_ttl,
        release_ttl=ttl,
        ca=ca,
        join_token=join_token,
        cert_lifetime=lifetime,
        **replica,
    )
    sys.exit(run_control_plane(config))


def _check_replication(
    store: str | None, replica_id: str | None, advertise_url: str | None, leader_ttl: float
) -> dict[str, Any]:
    """The HA settings for ControlPlaneConfig; InputError for a bad one or one without --store."""
    if store is None:
        given = [name for name, value in (("--replica-id", replica_id), ("--advertise-url", advertise_url)) if value]
        if given:
            raise InputError(f"{' and '.join(given)} need --store etcd://HOST:PORT,... (high availability)")
        return {}
    from starmesh.reconciler.etcd_client import parse_etcd_url

    try:
        parse_etcd_url(store)
    except ValueError as exc:
        raise InputError(f"--store: {exc}") from None
    replica = replica_id or socket.gethostname()
    if not _REPLICA_ID.fullmatch(replica):
        raise InputError(f"--replica-id {replica[:80]!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if advertise_url is not None:
        parts = urllib.parse.urlsplit(advertise_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise InputError(f"--advertise-url {advertise_url!r}: give http(s)://HOST:PORT (how other replicas reach this one)")
    return {"store": store, "replica_id": replica, "advertise_url": advertise_url, "leader_ttl": leader_ttl}


def _check_store_tls_needs_store(*files: Path | None) -> None:
    given = [name for name, value in zip(("--store-ca", "--store-cert", "--store-key"), files, strict=True) if value]
    if given:
        raise InputError(f"{' and '.join(given)} need --store etcd://HOST:PORT,... (they are how to reach etcd)")


def _check_store_tls(ca: Path | None, cert: Path | None, key: Path | None) -> dict[str, Any]:
    """`--store-ca`, `--store-cert`, `--store-key` read and parsed (PEM), the pair matching;
    ControlPlaneConfig's store_ca, store_cert, store_key."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    if (cert is None) != (key is None):
        raise InputError("--store-cert and --store-key go together: the client certificate and its private key")
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(_read_pem("--store-ca", ca))
        except ValueError:
            raise InputError(f"--store-ca {ca}: not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    if cert is not None and key is not None:
        try:
            certificate = x509.load_pem_x509_certificate(_read_pem("--store-cert", cert))
        except ValueError:
            raise InputError(f"--store-cert {cert}: not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
        try:
            private = serialization.load_pem_private_key(_read_pem("--store-key", key), password=None)
        except TypeError:
            raise InputError(f"--store-key {key}: the key is encrypted; give an unencrypted PEM private key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise InputError(f"--store-key {key}: not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
        if private.public_key() != certificate.public_key():
            raise InputError(f"--store-key {key} is not the key of --store-cert {cert}")
    return {
        "store_ca": None if ca is None else str(ca),
        "store_cert": None if cert is None else str(cert),
        "store_key": None if key is None else str(key),
    }


def _read_pem(option: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise InputError(f"{option} {path}: not a PEM file (no -----BEGIN line)")
    return data
