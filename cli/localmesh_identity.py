"""The mesh identity of `starmesh up`: the mesh CA and the join token in the state dir.

    STATE/ca/ca.crt, ca.key   the mesh root (`starmesh ca init`): made on the first run
                              with the trust domain of the policy's mesh(trust_domain = ...),
                              reused afterwards (its trust domain is read back from ca.crt)
    STATE/join-token          32 random url-safe characters, mode 0600, made once

    control plane  --ca STATE/ca --join-token T        (serves https://, issues SVIDs)
    each sidecar   --ca-cert STATE/ca/ca.crt, T in STARMESH_JOIN_TOKEN (not in argv: ps)

The trust domain comes from compiling the policy at the followed branch's tip (the
same commit the control plane compiles first). A tip that does not compile on the
first run leaves `up` no trust domain to make the root for: StartFailed with the first
diagnostic, before anything is started. Later runs do not compile: the root says.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from starmesh.cli.localmesh_errors import SetupError, StartFailed
from starmesh.cli.localmesh_state import PolicyRepo, StateLayout

__all__ = ["JOIN_TOKEN_ENV", "MeshIdentity", "prepare_identity"]

JOIN_TOKEN_ENV = "STARMESH_JOIN_TOKEN"
"""Where `starmesh proxy` reads the join token from when --join-token is not given."""
_TOKEN_BYTES = 24
"""24 random bytes are 32 url-safe base64 characters."""
_MAX_TOKEN_FILE = 4096


@dataclass(frozen=True)
class MeshIdentity:
    """The mesh root and the join token a local mesh runs with."""

    ca_dir: Path
    trust_domain: str
    join_token: str
    token_file: Path
    ca_created: bool
    token_created: bool

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"


def _trust_domain_of_policy(repo: PolicyRepo) -> str:
    """mesh(trust_domain = ...) of the branch's tip; StartFailed when it does not compile."""
    from starmesh.compiler.compile import compile_commit
    from starmesh.compiler.errors import SourceError

    try:
        result = compile_commit(repo.path, repo.branch, repo.subdir)
    except SourceError as exc:
        raise StartFailed(f"cannot read the policy at {repo.path} branch {repo.branch}: {exc}") from exc
    if result.bundle is None:
        first = next((f for f in result.findings if f.severity == "error"), None)
        why = first.concise() if first is not None else "it does not compile"
        raise StartFailed(
            f"the policy at {repo.policy_root} (branch {repo.branch}) does not compile, so the mesh's trust "
            f"domain for its CA is unknown: {why}\nFix it, commit, and run starmesh up again "
            f"(`starmesh lint {repo.policy_root}` shows every finding)"
        )
    return result.bundle.spec.mesh.trust_domain


def _ca(layout: StateLayout, repo: PolicyRepo) -> tuple[str, bool]:
    """(trust domain, created) of STATE/ca, made when neither of its files is there."""
    from starmesh.reconciler.ca import CA_CERT_FILE, CA_KEY_FILE, init_ca, load_ca
    from starmesh.reconciler.errors import CAError

    present = [path for path in (layout.ca / CA_CERT_FILE, layout.ca / CA_KEY_FILE) if path.exists()]
    try:
        if not present:
            trust_domain = _trust_domain_of_policy(repo)
            init_ca(trust_domain, layout.ca)
            return trust_domain, True
        return load_ca(layout.ca).trust_domain, False
    except CAError as exc:
        raise SetupError(
            f"mesh CA in {layout.ca}: {exc}; to start over with a new root remove {layout.ca} and "
            f"{layout.root / 'proxies'} (each sidecar's certificate is from the old one)"
        ) from exc


def _join_token(path: Path) -> tuple[str, bool]:
    """(the token, created): read from `path`, or made there (0600, written exclusively)."""
    from starmesh.reconciler.certificates import check_join_token

    try:
        with open(path, "rb") as file:
            token = file.read(_MAX_TOKEN_FILE + 1).decode("ascii", "replace").strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(token + "\n")
        except OSError as exc:
            raise SetupError(f"{path}: cannot write the join token: {exc.strerror or exc}") from exc
        return token, True
    except OSError as exc:
        raise SetupError(f"{path}: cannot read the join token: {exc.strerror or exc}") from exc
    try:
        check_join_token(token)
    except ValueError as exc:
        raise SetupError(f"{path}: the join token {exc}; remove the file and starmesh up makes a new one") from exc
    return token, False


def prepare_identity(layout: StateLayout, repo: PolicyRepo) -> MeshIdentity:
    """The mesh CA and join token of the state dir: made on the first run, reused after."""
    trust_domain, ca_created = _ca(layout, repo)
    token, token_created = _join_token(layout.join_token)
    return MeshIdentity(layout.ca, trust_domain, token, layout.join_token, ca_created, token_created)
