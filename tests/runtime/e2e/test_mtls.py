"""mTLS at the inbound listener, seen by clients outside the process: curl and openssl s_client.

The reviews service's proxy parts (tests/runtime/mtls_support.py's Node, wired as the
proxy wires them) run on a uvloop thread in front of an echo app, with an SVID issued
by a real mesh CA (reconciler/ca.py). The clients are the real `curl` and `openssl`
binaries, as an operator would use them:

    openssl s_client -connect HOST:PORT -CAfile ca.crt -cert svc.crt -key svc.key -verify_return_error
    curl --cacert ca.crt --cert svc.crt --key svc.key -k --pinnedpubkey peer.pub https://HOST:PORT/

(An SVID names a SPIFFE ID, not a host, so curl's host name check cannot pass: `-k` turns
it off, and `--pinnedpubkey` still authenticates the server by its key.)
"""

from __future__ import annotations

import runpy
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

support = SimpleNamespace(
    **runpy.run_path(str(Path(__file__).parent.parent / "mtls_support.py"), run_name="mtls_support")
)

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None, reason="needs the curl and openssl binaries"
)

POLICY = """
mesh(name = "m", mtls = "{mode}")
service(name = "reviews", versions = ["v1"])
service(name = "productpage", versions = ["v1"])
service(name = "ratings", versions = ["v1"])
authorization("reviews", rules = [allow(sources = ["productpage"])])
"""

REQUEST = b"GET /reviews/1 HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("pki")
    ca = support.MeshTestCA.create(base / "mesh")
    other = support.MeshTestCA.create(base / "other")
    pki = SimpleNamespace(
        ca=ca.cert,
        other_ca=other.cert,
        reviews=ca.svid("reviews"),
        productpage=ca.svid("productpage"),
        ratings=ca.svid("ratings"),
        foreign=other.svid("productpage"),
    )
    for name in ("reviews", "productpage"):
        cert = x509.load_pem_x509_certificate(getattr(pki, name).cert.read_bytes())
        pem = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (base / f"{name}.pub").write_bytes(pem)
        setattr(pki, f"{name}_pub", base / f"{name}.pub")
    return pki


def serve(pki: SimpleNamespace, tmp_path: Path, mode: str) -> Any:
    bundle = support.compile_policy(tmp_path / "policy", POLICY.format(mode=mode))
    return support.BackgroundNode(pki.ca, pki.reviews, bundle)


def curl(*args: str) -> tuple[int, int, str]:
    """(curl's exit code, the HTTP status or 0 when there was none, the response head and body)."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-D", "-", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )
    output, _, code = done.stdout.rpartition("\n")
    return done.returncode, int(code or 0), output + done.stderr


def tls_curl(pki: SimpleNamespace, target: str, client: str | None, *, pin: str = "reviews") -> tuple[int, int, str]:
    args = ["--cacert", str(pki.ca), "-k", "--pinnedpubkey", str(getattr(pki, f"{pin}_pub"))]
    if client is not None:
        credential = getattr(pki, client)
        args += ["--cert", str(credential.cert), "--key", str(credential.key)]
    return curl(*args, f"https://{target}/reviews/1")


def s_client(target: str, ca: Path, credential: Any | None) -> tuple[int, str]:
    args = ["openssl", "s_client", "-connect", target, "-CAfile", str(ca), "-verify_return_error", "-quiet"]
    if credential is not None:
        args += ["-cert", str(credential.cert), "-key", str(credential.key)]
    done = subprocess.run(args, input=REQUEST, capture_output=True, timeout=30, check=False)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def test_curl_against_strict(pki: SimpleNamespace, tmp_path: Path) -> None:
    with serve(pki, tmp_path, "strict") as node:
        exit_code, status, output = tls_curl(pki, node.inbound, "productpage")
        assert (exit_code, status) == (0, 200), output
        assert '"x-forwarded-for"' in output  # the echo app answered, behind the proxy
        # Authenticated as ratings, which the policy does not admit.
        exit_code, status, output = tls_curl(pki, node.inbound, "ratings")
        assert status == 403 and "x-starmesh-error: denied" in output.lower(), output
        # Refused: no client certificate; another mesh's certificate; plaintext.
        for client in (None, "foreign"):
            exit_code, status, output = tls_curl(pki, node.inbound, client)
            assert exit_code != 0 and status == 0, (client, output)
        exit_code, status, output = curl(f"http://{node.inbound}/reviews/1")
        assert exit_code != 0 and status == 0, output
        # The pin is what authenticates the server here: the wrong key is refused by curl.
        exit_code, status, output = tls_curl(pki, node.inbound, "productpage", pin="productpage")
        assert exit_code != 0 and status == 0 and "pinned" in output.lower(), output
        assert node.tls.refused.get("plaintext") == 1 and node.tls.refused.get("handshake", 0) >= 2, node.tls.refused


def test_curl_against_permissive(pki: SimpleNamespace, tmp_path: Path) -> None:
    with serve(pki, tmp_path, "permissive") as node:
        exit_code, status, output = tls_curl(pki, node.inbound, "productpage")
        assert (exit_code, status) == (0, 200), output
        # Plaintext is accepted, but carries no identity: the policy admits nobody anonymous.
        exit_code, status, output = curl("-H", "x-starmesh-source: productpage", f"http://{node.inbound}/reviews/1")
        assert status == 403 and "unauthenticated caller" in output, output
        assert node.tls.accepted == {"mtls": 1, "plaintext": 1}


def test_openssl_s_client_against_strict(pki: SimpleNamespace, tmp_path: Path) -> None:
    with serve(pki, tmp_path, "strict") as node:
        code, output = s_client(node.inbound, pki.ca, pki.productpage)
        assert code == 0 and "HTTP/1.1 200" in output, output
        # Without a client certificate the handshake is refused: no HTTP answer.
        code, output = s_client(node.inbound, pki.ca, None)
        assert "HTTP/1.1" not in output, output
        # The server's SVID does not chain to another CA: the client refuses it.
        code, output = s_client(node.inbound, pki.other_ca, pki.productpage)
        assert code != 0 and "HTTP/1.1" not in output and "verify" in output.lower(), output
