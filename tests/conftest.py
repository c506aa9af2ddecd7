"""Fixtures every test folder may use: a real etcd (high availability, issue 9).

    etcd_server                     a fresh single-member etcd on loopback, its data in tmp_path
      .url                          "etcd://127.0.0.1:<client port>" (what --store takes)
      .client_url                   "http://127.0.0.1:<client port>"
      .kill()                       SIGKILL, as a crash would (data stays)
      .stop()                       SIGTERM and wait
      .start()                      start again on the same ports and data dir (after kill/stop)
      .running                      whether the process is up

    etcd_factory(name)              another one (a test needing two separate etcds)
    etcd_factory(name, tls=etcd_pki, extra_args=[...])
                                    with TLS: https client URLs, a server certificate for
                                    127.0.0.1 and localhost, --client-cert-auth against
                                    etcd_pki's CA; extra_args go to etcd as they are
                                    (e.g. ["--max-request-bytes", "65536"])

    etcd_pki                        a test CA, etcd's server certificate and a client
      .ca, .server_cert/.server_key certificate it signed, and a client certificate from
      .client_cert/.client_key      another CA (PEM files in tmp_path), made with
      .other_cert/.other_key        `cryptography`

The `etcd` binary comes from Debian's `etcd-server`, which .ci/run installs. Without it the
tests that need it skip, except under CI, where a missing etcd is a failure. Every etcd
started is stopped at the end of its test.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD_START_DEADLINE = 30.0
"""Seconds etcd may take to answer /health after it starts: a bound, not a speed assertion."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _PortTaken(RuntimeError):
    """etcd could not bind its ports: another process took them after they were picked."""


@dataclass(frozen=True)
class EtcdPKI:
    """PEM files for an etcd with TLS: its CA, server pair, a client pair it trusts, and a
    client pair from another CA (which it must refuse)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path
    other_key: Path


def _new_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def _write_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], name: str, hosts: Sequence[str], out: Path
) -> tuple[Path, Path]:
    """A leaf for `name` signed by `ca`, good for server and client auth (etcd's gRPC gateway
    presents the server certificate as a client to etcd itself); (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts
    ]
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca[0].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )  # fmt: skip
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(builder.sign(ca[1], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_etcd_pki(out: Path) -> EtcdPKI:
    out.mkdir(parents=True, exist_ok=True)
    ca, other = _new_ca("etcd test CA"), _new_ca("another CA")
    (out / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    server = _write_leaf(ca, "etcd-server", ["127.0.0.1", "localhost"], out)
    client = _write_leaf(ca, "control-plane", [], out)
    stranger = _write_leaf(other, "stranger", [], out)
    return EtcdPKI(out / "ca.crt", *server, *client, *stranger)


class EtcdServer:
    """One etcd process on loopback with its own data dir; restartable on the same ports."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        name: str = "etcd",
        *,
        tls: EtcdPKI | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.name = name
        self.tls = tls
        self.extra_args = list(extra_args)
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self._set_urls()
        self.log = directory / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start (again: on the same ports and data). A first start whose ports another test
        took meanwhile (they are picked free, then released) retries on new ones."""
        for attempt in range(3):
            try:
                self._start()
                self._started = True
                return
            except _PortTaken:
                if self._started or attempt == 2:
                    raise
                self.client_port, self.peer_port = _free_port(), _free_port()
                self._set_urls()

    def _set_urls(self) -> None:
        scheme = "https" if self.tls is not None else "http"
        self.client_url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.url = f"etcd://127.0.0.1:{self.client_port}"

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file", str(self.tls.server_cert),
            "--key-file", str(self.tls.server_key),
            "--client-cert-auth",
            "--trusted-ca-file", str(self.tls.ca),
        ]  # fmt: skip

    def _health_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return context

    def _start(self) -> None:
        assert not self.running, "etcd is running already"
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.directory / f"{self.name}.data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--logger", "zap",
            # tests run on a shared machine: no fsync-bound latency alarms in the log
            "--unsafe-no-fsync",
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ETCD_START_DEADLINE
        context = self._health_context()
        while True:
            if self._process.poll() is not None:
                if "address already in use" in self.log.read_text(errors="replace")[-2000:]:
                    raise _PortTaken(self.client_url)
                raise RuntimeError(f"etcd exited with {self._process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.client_url + "/health", timeout=2, context=context) as answer:
                    if b'"true"' in answer.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"etcd did not become healthy in {ETCD_START_DEADLINE}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _etcd_binary() -> str:
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed: .ci/run installs Debian's etcd-server")
        pytest.skip("etcd is not installed (apt install etcd-server)")
    return binary


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[[str], EtcdServer]]:
    started: list[EtcdServer] = []
    binary = _etcd_binary()

    def make(name: str = "etcd", *, tls: EtcdPKI | None = None, extra_args: Sequence[str] = ()) -> EtcdServer:
        server = EtcdServer(binary, tmp_path, name, tls=tls, extra_args=extra_args)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def etcd_server(etcd_factory: Callable[[str], EtcdServer]) -> EtcdServer:
    return etcd_factory("etcd")


@pytest.fixture
def etcd_pki(tmp_path: Path) -> EtcdPKI:
    return make_etcd_pki(tmp_path / "etcd-pki")
