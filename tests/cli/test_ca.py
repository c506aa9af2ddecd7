"""`starmesh ca init`, run as the real command: the files, their modes, refusals, exit codes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from starmesh.bundle.identity import load_certificates, verify_svid
from starmesh.reconciler.ca import issue_svid, load_ca

STARMESH = Path(sys.executable).with_name("starmesh")
DEADLINE = 30.0
"""Seconds a command may take: a bound on waiting, never an assertion about speed."""
ENV = {name: value for name, value in os.environ.items() if name != "FORCE_COLOR"} | {"NO_COLOR": "1"}


def starmesh(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STARMESH), *args], capture_output=True, text=True, timeout=DEADLINE, umask=umask, env=ENV
    )


def test_ca_init_writes_the_root_and_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    out = tmp_path / "state" / "ca"
    done = starmesh("ca", "init", "--trust-domain", "prod.example.com", "--out", str(out), umask=0)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600  # even with umask 0
    assert stat.S_IMODE((out / "ca.crt").stat().st_mode) == 0o644
    assert (out / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    root = load_certificates((out / "ca.crt").read_bytes())[0]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"certificate   {out / 'ca.crt'}")
    assert lines[1].startswith(f"private key   {out / 'ca.key'}")
    assert lines[2].startswith("trust domain  prod.example.com")
    assert lines[3] == "sha256        " + root.fingerprint(hashes.SHA256()).hex(":").upper()
    assert done.stderr == ""


def test_the_new_ca_issues_svids_for_its_trust_domain(tmp_path: Path) -> None:
    assert starmesh("ca", "init", "--trust-domain", "prod.example.com", "--out", str(tmp_path)).returncode == 0
    ca = load_ca(tmp_path)
    assert ca.trust_domain == "prod.example.com"
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://prod.example.com/service/ratings")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    now = datetime.now(timezone.utc)
    leaf_pem = issue_svid(ca, request, service="ratings", lifetime=timedelta(hours=1), now=now)
    chain = [load_certificates(leaf_pem)[0].public_bytes(serialization.Encoding.DER)]
    assert verify_svid(chain, [ca.certificate], trust_domain="prod.example.com", now=now, usage="client") == "ratings"
    if shutil.which("openssl"):
        (tmp_path / "leaf.pem").write_bytes(leaf_pem)
        checked = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "leaf.pem")],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_ca_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert starmesh("ca", "init", "--trust-domain", "cluster.local", "--out", str(tmp_path)).returncode == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("ca.crt", "ca.key")}
    done = starmesh("ca", "init", "--trust-domain", "cluster.local", "--out", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"starmesh: error: {tmp_path / 'ca.crt'}: already exists")
    assert done.stdout == ""
    assert {name: (tmp_path / name).read_bytes() for name in ("ca.crt", "ca.key")} == before


@pytest.mark.parametrize("trust_domain", ["Cluster.Local", "cluster_local", "spiffe://cluster.local", ""])
def test_ca_init_refuses_a_bad_trust_domain(tmp_path: Path, trust_domain: str) -> None:
    done = starmesh("ca", "init", "--trust-domain", trust_domain, "--out", str(tmp_path / "ca"))
    assert done.returncode == 2
    assert "invalid trust domain" in done.stderr and "lower-case DNS name" in done.stderr
    assert not (tmp_path / "ca").exists()


def test_ca_init_needs_both_options(tmp_path: Path) -> None:
    done = starmesh("ca", "init", "--out", str(tmp_path / "ca"))
    assert done.returncode == 2
    assert "--trust-domain" in done.stderr
    assert not (tmp_path / "ca").exists()
