"""EtcdStore over TLS with a client certificate (etcd's --client-cert-auth), on a real etcd.

The certificates come from tests/conftest.py's `etcd_pki` (a test CA made with
`cryptography`, and a second CA whose client certificate etcd must refuse). The last test
runs a real `starmesh control-plane --store ... --store-ca/--store-cert/--store-key`
process and reads its release from /v1/status. Waits poll with a deadline.
"""

from __future__ import annotations

import json
import re
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from starmesh.reconciler.errors import StoreUnavailable
from starmesh.reconciler.etcd_client import EtcdTLS, parse_etcd_url
from starmesh.reconciler.etcd_store import EtcdStore

DEADLINE = 30.0
"""Seconds a wait may take: a bound on waiting, never an assertion about speed."""
STARMESH = Path(sys.executable).with_name("starmesh")


@pytest.fixture
def tls_etcd(etcd_factory: Any, etcd_pki: Any) -> Any:
    return etcd_factory("etcd-tls", tls=etcd_pki)


def open_store(server: Any, tls: EtcdTLS | None, **options: Any) -> EtcdStore:
    store = EtcdStore(parse_etcd_url(server.url), tls=tls, probe_interval=0.1, **options)
    store.start()
    return store


def test_the_store_works_over_tls_with_a_client_certificate(tls_etcd: Any, etcd_pki: Any) -> None:
    tls = EtcdTLS(str(etcd_pki.ca), str(etcd_pki.client_cert), str(etcd_pki.client_key))
    writer, reader = open_store(tls_etcd, tls), open_store(tls_etcd, tls, chunk_size=1024)
    try:
        writer.put("status/last-commit", b"abc")
        reader.put("bundles/sha256-e", b"b" * 5000)  # in parts, each over TLS
        assert reader.wait_synced(DEADLINE) and writer.wait_synced(DEADLINE)  # both watches over TLS
        assert reader.get("status/last-commit") == b"abc"
        assert writer.get("bundles/sha256-e") == b"b" * 5000
        assert writer.health().available and writer.health().member == f"127.0.0.1:{tls_etcd.client_port}"
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize(
    ("client", "says"),
    [
        ("none", "etcd refused the TLS handshake .*check --store-cert and --store-key"),
        ("other CA", "etcd refused the TLS handshake .*check --store-cert and --store-key"),
        ("wrong CA", "etcd's server certificate is not trusted .*CERTIFICATE_VERIFY_FAILED.*check --store-ca"),
        ("plain", "etcd cannot be reached"),
    ],
)
def test_without_a_trusted_client_certificate_etcd_is_unavailable_and_says_why(
    tls_etcd: Any, etcd_pki: Any, client: str, says: str
) -> None:
    tls = {
        "none": EtcdTLS(str(etcd_pki.ca)),
        "other CA": EtcdTLS(str(etcd_pki.ca), str(etcd_pki.other_cert), str(etcd_pki.other_key)),
        "wrong CA": EtcdTLS(str(etcd_pki.other_cert), str(etcd_pki.client_cert), str(etcd_pki.client_key)),
        "plain": None,
    }[client]
    store = EtcdStore(parse_etcd_url(tls_etcd.url), tls=tls, timeout=2, sync_timeout=0.5)
    with pytest.raises(StoreUnavailable, match=says) as raised:
        store.start()
    assert f"127.0.0.1:{tls_etcd.client_port}" in str(raised.value)


class _Process:
    """A child whose stdout lines a thread collects; killed (its session) at the end."""

    def __init__(self, args: list[str], log: Path) -> None:
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True
        )  # fmt: skip
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def line(self, starts: str) -> str:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line.startswith(starts):
                return line
        raise AssertionError(f"no {starts!r} line within {DEADLINE}s; stderr: {self._log.name}")

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(DEADLINE)  # the pipe's end: the child and its session are gone
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[_Process]]:
    started: list[_Process] = []
    yield started
    for process in started:
        process.close()


def test_a_control_plane_on_a_tls_etcd_serves_a_release(
    tmp_path: Path, tls_etcd: Any, etcd_pki: Any, processes: list[_Process], h: Any
) -> None:
    repo = h.make_repo(tmp_path / "policy")
    commit = h.commit(repo, {"mesh.star": h.policy("v1", expect="v1")})
    keys = h.keys(tmp_path / "keys")
    cp = _Process(
        [
            str(STARMESH), "control-plane", "--repo", str(repo), "--key", str(keys.private),
            "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0", "--poll-interval", "3600",
            "--store", tls_etcd.url, "--replica-id", "r1", "--store-ca", str(etcd_pki.ca),
            "--store-cert", str(etcd_pki.client_cert), "--store-key", str(etcd_pki.client_key),
        ],
        tmp_path / "cp.log",
    )  # fmt: skip
    processes.append(cp)
    address = cp.line("listening ").removeprefix("listening ")
    assert cp.line("ready release ").startswith("ready release 1 sha256:")
    with urllib.request.urlopen(f"http://{address}/v1/status", timeout=DEADLINE) as answer:  # noqa: S310 - loopback
        status = json.loads(answer.read())
    assert status["release"]["version"] == 1 and status["release"]["commit"] == commit
    assert status["control_plane"]["store"]["available"] is True
    cp.popen.send_signal(signal.SIGTERM)
    assert cp.popen.wait(DEADLINE) == 0


# -- the CLI's checks of --store-ca, --store-cert, --store-key (exit 2, one line) ------------


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ({"--store-ca": "ca"}, "--store-ca need --store etcd://"),
        ({"--store-cert": "client_cert", "--store-key": "client_key"}, "--store-cert and --store-key need --store"),
        ({"--store": "", "--store-cert": "client_cert"}, "--store-cert and --store-key go together"),
        ({"--store": "", "--store-ca": "missing"}, "--store-ca .*missing.pem: cannot read it"),
        ({"--store": "", "--store-ca": "text"}, "--store-ca .*: not a PEM file"),
        ({"--store": "", "--store-ca": "client_key"}, "--store-ca .*: not a PEM certificate"),
        ({"--store": "", "--store-cert": "client_cert", "--store-key": "ca"}, "--store-key .*: not a PEM private key"),
        ({"--store": "", "--store-cert": "client_cert", "--store-key": "other_key"}, "is not the key of --store-cert"),
    ],
)
def test_bad_store_tls_options_exit_2_saying_why(tmp_path: Path, etcd_pki: Any, files: dict[str, str], says: str) -> None:
    from click.testing import CliRunner

    from starmesh.cli.main import main

    (tmp_path / "text.pem").write_text("not a certificate\n")
    paths = {"missing": tmp_path / "missing.pem", "text": tmp_path / "text.pem"}
    args = ["control-plane", "--repo", str(tmp_path), "--key", str(tmp_path / "k"), "--state-dir", str(tmp_path / "s")]
    args += ["--listen", "127.0.0.1:0"]
    for option, name in files.items():
        args += [option, "etcd://127.0.0.1:2379" if option == "--store" else str(paths.get(name) or getattr(etcd_pki, name))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(says, lines[0]), result.output
    assert not (tmp_path / "s").exists()
