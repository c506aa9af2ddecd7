"""The proxy's workload identity (runtime/workload.py): its certificate from the control plane.

A real mesh CA (reconciler/ca.py's `init_ca`) and a small HTTPS certificate server
(`CertServer`, aiohttp on 127.0.0.1:0 in its own `rt.BackgroundApps` thread) that issues
with `issue_svid`, checks the join token or the caller's client SVID, and answers wrongly
on purpose. The identity runs in-process (`asyncio.run`); what is process-level (exit
codes, a restart while the control plane is down, the real control plane) runs `starmesh`
processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from starmesh.bundle.errors import IdentityError
from starmesh.bundle.identity import verify_svid
from starmesh.reconciler.ca import MeshCA, init_ca, issue_svid, load_ca, server_certificate
from starmesh.runtime.control_http import ControlPlaneSettings
from starmesh.runtime.errors import WorkloadError
from starmesh.runtime.workload import WorkloadIdentity, WorkloadLimits
from starmesh.runtime.workload_cert import accept, new_request
from starmesh.runtime.workload_files import CERT_FILE, KEY_FILE, NEXT_KEY_FILE, load, save

TD = "mesh.test"
TOKEN = "join-token-0123456789abcdef"
DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""
FAST = WorkloadLimits(backoff_base=0.05, backoff_cap=0.3, min_renew_seconds=0.05)

T = TypeVar("T")


# -- the CA and the certificate server ----------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> MeshCA:
    directory = tmp_path_factory.mktemp("ca")
    init_ca(TD, directory)
    return load_ca(directory)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> MeshCA:
    """Another mesh's root, of the same trust domain."""
    directory = tmp_path_factory.mktemp("other-ca")
    init_ca(TD, directory)
    return load_ca(directory)


def pem(ca: MeshCA) -> bytes:
    return ca.certificate.public_bytes(Encoding.PEM)


@dataclass(frozen=True)
class Seen:
    """One certificate request as the server saw it."""

    at: datetime
    auth: str  # "token", "cert" (a valid client SVID of the service), "wrong-token", "none"
    service: str


class CertServer:
    """POST /v1/certificates over HTTPS, issuing with `issue_svid`; `answer` picks what it sends:
    "ok", "other-ca" (signed by another root), "other-service", "other-key", or an HTTP status."""

    def __init__(self, ca: MeshCA, other_ca: MeshCA, apps: Any, *, lifetime: timedelta = timedelta(hours=1)) -> None:
        self.ca, self.other_ca, self.lifetime = ca, other_ca, lifetime
        self.answer: str | int = "ok"
        self.requests: list[Seen] = []
        self.apps = apps  # its own BackgroundApps: closing the server closes them
        app = web.Application()
        app.router.add_post("/v1/certificates", self._issue)
        self.url = "https://" + apps.serve(app, ssl_context=self._context(), shutdown_timeout=0.5)

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=pem(self.ca).decode())
        cert, key = server_certificate(self.ca, ["127.0.0.1"], lifetime=timedelta(days=1))
        with tempfile.TemporaryDirectory() as private:
            path = Path(private) / "server.pem"
            path.write_bytes(cert + key)
            context.load_cert_chain(path)
        return context

    def _peer(self, request: web.Request, service: str) -> bool:
        assert request.transport is not None
        der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if not der:
            return False
        try:
            named = verify_svid([der], [self.ca.certificate], trust_domain=TD, now=datetime.now(UTC), usage="client")
        except IdentityError:
            return False
        return named == service

    async def _issue(self, request: web.Request) -> web.Response:
        body = await request.json()
        service, csr = body["service"], body["csr"].encode()
        header = request.headers.get("Authorization")
        auth = "token" if header == f"Bearer {TOKEN}" else "wrong-token" if header else "none"
        if auth != "token" and self._peer(request, service):
            auth = "cert"
        self.requests.append(Seen(datetime.now(UTC), auth, service))
        if auth not in ("token", "cert"):
            return web.json_response({"error": f"no valid join token or certificate ({auth})"}, status=401)
        if isinstance(self.answer, int):
            return web.json_response({"error": f"status {self.answer} on purpose"}, status=self.answer)
        signer = self.other_ca if self.answer == "other-ca" else self.ca
        if self.answer in ("other-service", "other-key"):
            service = "intruder" if self.answer == "other-service" else service
            csr = new_request(TD, service)[1]
        issued = issue_svid(signer, csr, service=service, lifetime=self.lifetime, now=datetime.now(UTC))
        return web.json_response({"certificate": issued.decode(), "ca": pem(self.ca).decode(), "expires_at": "-"})

    def close(self) -> None:
        """Stop answering (again: nothing): the control plane is down from here on."""
        self.apps.close()


@pytest.fixture
def servers(ca: MeshCA, other_ca: MeshCA, rt: Any) -> Iterator[Callable[..., CertServer]]:
    started: list[Any] = []

    def start(**kw: Any) -> CertServer:
        apps = rt.BackgroundApps()
        started.append(apps)
        return CertServer(ca, other_ca, apps, **kw)

    try:
        yield start
    finally:
        for apps in started:
            apps.close()


# -- running an identity in-process ---------------------------------------------------------------


def identity_for(state: Path, ca: MeshCA, *, token: str | None = TOKEN) -> WorkloadIdentity:
    state.mkdir(parents=True, exist_ok=True)
    return WorkloadIdentity(service="web", state_dir=state, ca_pem=pem(ca), join_token=token, limits=FAST)


def run(identity: WorkloadIdentity, url: str, scenario: Callable[[WorkloadIdentity], Awaitable[T]]) -> T:
    """Load, start against `url`, run `scenario`, and always stop the identity's task and session."""

    async def main() -> T:
        identity.load()
        settings = ControlPlaneSettings(
            urls=(url,), trusted=(), proxy_id="web-v1-test", service="web", version="v1",
            tls=identity.control_plane_context,
        )  # fmt: skip
        identity.start(settings)
        try:
            return await scenario(identity)
        finally:
            await identity.close()

    return asyncio.run(main())


async def until(check: Callable[[], object], what: str) -> Any:
    end = time.monotonic() + DEADLINE
    while not (result := check()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def gauge(identity: WorkloadIdentity) -> float | None:
    """`starmesh_certificate_expiry_seconds` as the proxy reads it (ControlLink.certificate_expiry)."""
    return identity.expires_in()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- bootstrap, files, restart -------------------------------------------------------------------------


def test_bootstrap_with_the_join_token_writes_key_and_certificate_0600(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer]
) -> None:
    server = servers()
    identity = identity_for(tmp_path / "state", ca)
    assert gauge(identity) is None  # no sample before the first certificate

    async def scenario(identity: WorkloadIdentity) -> None:
        await asyncio.wait_for(identity.wait_ready(), DEADLINE)
        await until(lambda: (tmp_path / "state" / CERT_FILE).exists(), "the certificate on disk")

    run(identity, server.url, scenario)
    assert [seen.auth for seen in server.requests] == ["token"]
    current = identity.current
    assert current is not None
    assert current.spiffe_id == f"spiffe://{TD}/service/web"  # the trust domain the mesh root names
    state = tmp_path / "state"
    assert mode(state / KEY_FILE) == 0o600 and mode(state / CERT_FILE) == 0o600
    assert (state / CERT_FILE).read_bytes() == current.cert_pem
    assert (state / KEY_FILE).read_bytes() == current.key_pem
    assert sorted(p.name for p in state.iterdir()) == [CERT_FILE, KEY_FILE]  # no temp files left behind
    leaf = x509.load_pem_x509_certificate(current.cert_pem)
    assert verify_svid([leaf.public_bytes(Encoding.DER)], [ca.certificate], trust_domain=TD,
                       now=datetime.now(UTC), usage="server") == "web"  # fmt: skip
    left = gauge(identity)
    assert left is not None and 0 < left <= 3600


def test_restart_reuses_the_certificate_with_the_control_plane_down(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer]
) -> None:
    server = servers()
    first = identity_for(tmp_path / "state", ca)
    run(first, server.url, lambda identity: asyncio.wait_for(identity.wait_ready(), DEADLINE))
    url = server.url
    server.close()  # the control plane is down from here on

    again = identity_for(tmp_path / "state", ca, token=None)  # no join token either

    async def scenario(identity: WorkloadIdentity) -> None:
        assert identity.current is not None  # loaded at once, before any request
        assert identity.control_plane_context() is not identity._bare  # it presents the certificate
        await asyncio.sleep(0.2)

    run(again, url, scenario)
    assert first.current is not None and again.current is not None
    assert again.current.cert_pem == first.current.cert_pem
    assert again.last_error is None  # not past half-life: nothing was asked for


def test_without_a_certificate_or_join_token_the_identity_refuses_to_start(tmp_path: Path, ca: MeshCA) -> None:
    identity = identity_for(tmp_path / "state", ca, token=None)
    with pytest.raises(WorkloadError, match="the first certificate needs the mesh's join token; give --join-token"):
        identity.load()


def test_a_rotation_cut_short_is_finished_on_load(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer]
) -> None:
    server = servers()
    identity = identity_for(tmp_path / "state", ca)
    run(identity, server.url, lambda identity: asyncio.wait_for(identity.wait_ready(), DEADLINE))
    state, old = tmp_path / "state", identity.current
    assert old is not None
    key, csr = new_request(TD, "web")
    newer = issue_svid(ca, csr, service="web", lifetime=timedelta(hours=1), now=datetime.now(UTC))
    credential = accept(key, newer, (ca.certificate,), service="web", trust_domain=TD, now=datetime.now(UTC))
    save(state, credential)
    # A crash between the certificate and the key: the new certificate, the new key still aside.
    (state / NEXT_KEY_FILE).write_bytes(credential.key_pem)
    (state / KEY_FILE).write_bytes(old.key_pem)
    loaded, why = load(state, (ca.certificate,), service="web", now=datetime.now(UTC))
    assert loaded is not None, why
    assert loaded.cert_pem == credential.cert_pem
    assert (state / KEY_FILE).read_bytes() == credential.key_pem and not (state / NEXT_KEY_FILE).exists()


def test_a_certificate_on_disk_for_another_service_is_not_used(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer]
) -> None:
    server = servers()
    identity = identity_for(tmp_path / "state", ca)
    run(identity, server.url, lambda identity: asyncio.wait_for(identity.wait_ready(), DEADLINE))
    loaded, why = load(tmp_path / "state", (ca.certificate,), service="api", now=datetime.now(UTC))
    assert loaded is None and "names service 'web', not 'api'" in why


# -- renewal, rotation, refusals -------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(100):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _peer_certificate(port: int, identity: WorkloadIdentity) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=identity.client_context())
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    return writer.get_extra_info("ssl_object").getpeercert(binary_form=True), reader, writer


def _der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)


def test_renewal_at_half_life_with_the_client_certificate_rebuilds_the_contexts(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer]
) -> None:
    server = servers(lifetime=timedelta(seconds=6))
    identity = identity_for(tmp_path / "state", ca)

    async def scenario(identity: WorkloadIdentity) -> None:
        await asyncio.wait_for(identity.wait_ready(), DEADLINE)
        first = identity.current
        assert first is not None
        old_server, old_client = identity.server_context(), identity.client_context()
        before = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=old_server)
        try:
            peer, reader, writer = await _peer_certificate(before.sockets[0].getsockname()[1], identity)
            assert peer == _der(first.cert_pem)
            await until(lambda: identity.current is not first, "a renewed certificate")
            second = identity.current
            assert second is not None and second.cert_pem != first.cert_pem
            # New contexts, presenting the new certificate; the old ones are left as they were.
            assert identity.server_context() is not old_server and identity.client_context() is not old_client
            after = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=identity.server_context())
            try:
                fresh, fresh_reader, fresh_writer = await _peer_certificate(after.sockets[0].getsockname()[1], identity)
                assert fresh == _der(second.cert_pem)
                fresh_writer.close()
            finally:
                after.close()
            writer.write(b"pong")  # the connection made before the rotation keeps working
            assert await reader.readexactly(4) == b"pong"
            writer.close()
        finally:
            before.close()
        assert first.renew_at <= server.requests[1].at < first.not_after

    run(identity, server.url, scenario)
    assert [seen.auth for seen in server.requests[:2]] == ["token", "cert"]  # renewal: no token sent
    state = tmp_path / "state"
    current = identity.current
    assert current is not None
    # A renewal that landed as the identity closed is still being written by its worker
    # thread (installed first, then saved); the file catches up with what is in use.
    end = time.monotonic() + DEADLINE
    while (state / CERT_FILE).read_bytes() != current.cert_pem and time.monotonic() < end:
        time.sleep(0.05)
    assert (state / CERT_FILE).read_bytes() == current.cert_pem
    assert mode(state / CERT_FILE) == 0o600 and mode(state / KEY_FILE) == 0o600
    assert not (state / NEXT_KEY_FILE).exists()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("other-ca", "does not chain to the mesh CA"),
        ("other-service", "names service 'intruder', not 'web'"),
        ("other-key", "not for this proxy's key"),
        (500, "answered the certificate request with HTTP 500"),
    ],
)
def test_a_returned_certificate_that_does_not_verify_is_refused(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer], answer: str | int, why: str
) -> None:
    server = servers()
    server.answer = answer
    identity = identity_for(tmp_path / "state", ca)

    async def scenario(identity: WorkloadIdentity) -> None:
        await until(lambda: len(server.requests) >= 3, "retries")  # backoff, not a crash
        assert identity._task is not None and not identity._task.done()

    run(identity, server.url, scenario)
    assert identity.current is None
    assert identity.last_error is not None and why in identity.last_error, identity.last_error
    assert not (tmp_path / "state" / CERT_FILE).exists() and not (tmp_path / "state" / KEY_FILE).exists()
    with pytest.raises(WorkloadError, match="no workload certificate yet"):
        identity.server_context()


def test_a_wrong_join_token_is_a_clear_error_retried_with_backoff(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="starmesh.proxy")
    server = servers()
    identity = identity_for(tmp_path / "state", ca, token="not-the-join-token")

    async def scenario(identity: WorkloadIdentity) -> None:
        await until(lambda: len(server.requests) >= 4, "retries")
        assert "refused the join token" in identity.waiting_for()

    run(identity, server.url, scenario)
    assert {seen.auth for seen in server.requests} == {"wrong-token"}
    assert identity.current is None and identity.last_error is not None
    assert "refused the join token (HTTP 401: no valid join token" in identity.last_error
    assert "give the control plane's --join-token" in identity.last_error
    warnings = [r.getMessage() for r in caplog.records if "refused the join token" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per change, not once per retry


@pytest.mark.slow
def test_expiry_warning_once_and_the_gauge_when_renewal_keeps_failing(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="starmesh.proxy")
    server = servers(lifetime=timedelta(seconds=6))
    identity = identity_for(tmp_path / "state", ca)

    def logged(fragment: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]

    async def scenario(identity: WorkloadIdentity) -> None:
        await asyncio.wait_for(identity.wait_ready(), DEADLINE)
        first = identity.current
        assert first is not None
        server.answer = 503  # every renewal fails from now on
        await until(lambda: logged("and is not renewed yet"), "the expiry warning")
        left = gauge(identity)
        assert left is not None and left <= first.lifetime.total_seconds() / 4
        await until(lambda: logged("expired at"), "the expired error")
        after = gauge(identity)
        assert after is not None and after <= 0
        assert identity.control_plane_context() is identity._bare  # an expired certificate is not presented
        server.answer = "ok"  # the control plane is back: the join token gets a new certificate
        await until(lambda: identity.current is not first, "a new certificate")
        await until(lambda: logged("renewed: valid again"), "the renewed line")

    run(identity, server.url, scenario)
    assert len(logged("and is not renewed yet")) == 1
    assert len(logged("expired at")) == 1
    failures = [line for line in logged("answered the certificate request with HTTP 503") if "retrying with backoff" in line]
    assert len(failures) == 1, failures  # once per change, not once per retry
    assert [seen.auth for seen in server.requests][0] == "token" and server.requests[-1].auth == "token"
    assert "cert" in {seen.auth for seen in server.requests}  # renewals were tried with the certificate


# -- the proxy process -------------------------------------------------------------------------------------


def _proxy_argv(state: Path, ca_cert: Path, url: str, trust: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "starmesh.cli", "proxy", "--service", "web", "--version", "v1",
        "--app", "127.0.0.1:9", "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", str(state), "--control-plane", url, "--trust", str(trust), "--ca-cert", str(ca_cert), *extra,
    ]  # fmt: skip


@pytest.fixture
def files(tmp_path: Path, ca: MeshCA) -> dict[str, Path]:
    from starmesh.bundle.keys import generate_keypair

    ca_cert = tmp_path / "ca.crt"
    ca_cert.write_bytes(pem(ca))
    _, public = generate_keypair(tmp_path / "keys")
    return {"ca_cert": ca_cert, "trust": public}


def _dead_https_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "https://127.0.0.1:%d" % sock.getsockname()[1]


def test_the_join_token_variable_is_ignored_without_ca_cert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from starmesh.cli.main import main

    monkeypatch.setenv("STARMESH_JOIN_TOKEN", TOKEN)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bundle.json").write_text("{}")
    argv = [
        "proxy", "--service", "web", "--version", "v1", "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0",
        "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "a-file" / "s"),
        "--bundle", str(tmp_path / "bundle.json"),
    ]  # fmt: skip  (the state dir cannot be made: the last check, so the command stops there)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2 and "--state-dir" in result.output, result.output  # the variable was ignored
    result = CliRunner().invoke(main, [*argv, "--join-token", TOKEN])
    assert result.exit_code == 2 and "--join-token goes with --ca-cert FILE" in result.output, result.output


def test_the_proxy_exits_2_without_a_certificate_or_join_token(tmp_path: Path, files: dict[str, Path]) -> None:
    argv = _proxy_argv(tmp_path / "state", files["ca_cert"], _dead_https_url(), files["trust"])
    env = {k: v for k, v in os.environ.items() if k != "STARMESH_JOIN_TOKEN"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done
    assert "the first certificate needs the mesh's join token; give --join-token" in done.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--join-token", TOKEN], "--control-plane http://127.0.0.1:8400: with --ca-cert the control plane is reached over https://"),
        (["--ca-cert", "{missing}"], "cannot read it"),
        (["--ca-cert", "{trust}"], "not a PEM certificate"),
        (["--join-token", "has space"], "--join-token: give 1 to 1024 visible ASCII characters"),
    ],
)
def test_usage_errors_of_the_mesh_identity_options(
    tmp_path: Path, files: dict[str, Path], extra: list[str], message: str
) -> None:
    from click.testing import CliRunner

    from starmesh.cli.main import main

    names = {"missing": str(tmp_path / "missing.crt"), "trust": str(files["trust"])}
    url = "http://127.0.0.1:8400" if extra[0] == "--join-token" and extra[1] == TOKEN else "https://127.0.0.1:8400"
    argv = [
        "proxy", "--service", "web", "--version", "v1", "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0",
        "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
        "--control-plane", url, "--trust", str(files["trust"]),
    ]  # fmt: skip
    if "--ca-cert" not in extra:
        argv += ["--ca-cert", str(files["ca_cert"])]
    result = CliRunner().invoke(main, argv + [arg.format(**names) for arg in extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_restarted_proxy_starts_from_its_certificate_while_the_control_plane_is_down(
    tmp_path: Path, ca: MeshCA, servers: Callable[..., CertServer], files: dict[str, Path], mesh: Any
) -> None:
    server = servers()
    state = tmp_path / "state"
    run(identity_for(state, ca), server.url, lambda identity: asyncio.wait_for(identity.wait_ready(), DEADLINE))
    kept = (state / CERT_FILE).read_bytes()
    server.close()
    argv = _proxy_argv(state, files["ca_cert"], _dead_https_url(), files["trust"])
    proxy = mesh.start_proxy("web", "v1", "127.0.0.1:9", None, extra=argv[argv.index("--control-plane"):], state=state)
    proxy.read_status()
    assert f"starmesh proxy: mesh identity spiffe://{TD}/service/web" in "\n".join(proxy.printed)
    with urllib.request.urlopen(f"http://{proxy.admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    value = [line for line in metrics.splitlines() if line.startswith("starmesh_certificate_expiry_seconds ")]
    assert value and float(value[0].split()[1]) > 0, metrics
    assert (state / CERT_FILE).read_bytes() == kept
    assert proxy.process.popen.poll() is None


# -- against the real control plane ------------------------------------------------------------------------


POLICY = """
mesh(name = "t", trust_domain = "mesh.test", mtls = "permissive")
service(name = "web", versions = ["v1"])
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=60)


def _real_control_plane(tmp_path: Path, mesh: Any, policy: str, lifetime: str = "1h") -> tuple[Any, str, Path]:
    """`starmesh control-plane --ca DIR --join-token T` on a policy repo: (process, https URL, signing.pub)."""
    from starmesh.bundle.keys import generate_keypair

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.name", "test")
    _git(repo, "config", "user.email", "test@example.invalid")
    (repo / "mesh.star").write_text(policy)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "policy")
    key, public = generate_keypair(tmp_path / "keys")
    init_ca(TD, tmp_path / "ca")
    plane = mesh.start("control-plane", [
        sys.executable, "-m", "starmesh.cli", "control-plane", "--repo", str(repo), "--branch", "main",
        "--key", str(key), "--state-dir", str(tmp_path / "cp"), "--listen", "127.0.0.1:0",
        "--ca", str(tmp_path / "ca"), "--join-token", TOKEN, "--cert-lifetime", lifetime,
    ])  # fmt: skip
    address = plane.first_line(lambda line: line.startswith("listening "), "'listening' line").removeprefix("listening ")
    return plane, f"https://{address.strip()}", public


def _mesh_proxy(
    mesh: Any, tmp_path: Path, service: str, url: str, public: Path, app: str = "127.0.0.1:9", token: bool = True
) -> Any:
    """A proxy with --ca-cert; `token` False: no --join-token (the test sets STARMESH_JOIN_TOKEN instead)."""
    state = tmp_path / f"state-{service}"
    argv = _proxy_argv(state, tmp_path / "ca" / "ca.crt", url, public, *(["--join-token", TOKEN] if token else []))
    extra = argv[argv.index("--control-plane") :]
    proxy = mesh.start_proxy(service, "v1", app, None, extra=extra, state=state, log=tmp_path / f"{service}.log")
    proxy.read_status()
    return proxy


@pytest.mark.slow
def test_against_the_real_control_plane_join_renew_and_fetch_releases(tmp_path: Path, mesh: Any) -> None:
    plane, url, public = _real_control_plane(tmp_path, mesh, POLICY, lifetime="10s")
    proxy = _mesh_proxy(mesh, tmp_path, "web", url, public)
    assert proxy.status.startswith("not ready: ") and "waiting for the workload certificate" in proxy.status
    proxy.next_line(lambda line: line.startswith("applied release 1 "), "the first release, fetched with the certificate")
    state = tmp_path / "state-web"
    assert mode(state / CERT_FILE) == 0o600 and mode(state / KEY_FILE) == 0o600
    first = (state / CERT_FILE).read_bytes()
    end = time.monotonic() + DEADLINE
    while (state / CERT_FILE).read_bytes() == first:  # renewed at half-life (5 s) with its own certificate
        assert time.monotonic() < end, "the certificate was not renewed"
        time.sleep(0.1)
    renewed = x509.load_pem_x509_certificate((state / CERT_FILE).read_bytes())
    sans = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/service/web"]
    log = plane.output()
    assert "by join token" in log and "by renewal" in log, log
    with urllib.request.urlopen(f"http://{proxy.admin}/config", timeout=10) as response:
        config = json.loads(response.read())
    assert config["origin"] == "control-plane" and config["control_plane"]["connected"] is True


STRICT = """
mesh(name = "t", trust_domain = "mesh.test", mtls = "strict")
service(name = "web", versions = ["v1"])
service(name = "api", versions = ["v1"])
authorization("api", rules = [allow(sources = ["web"])])
"""


def _get(address: str, host: str) -> tuple[int, dict[str, str]]:
    """GET / from `address` with `Host: host`: (status, lower-cased headers); (0, {}) when the connection fails."""
    import http.client

    hostname, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(hostname, int(port), timeout=10)
    try:
        connection.request("GET", "/hello", headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    except (OSError, http.client.HTTPException):
        return 0, {}
    finally:
        connection.close()


def test_two_proxies_talk_mtls_with_their_workload_certificates(
    tmp_path: Path, mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url, public = _real_control_plane(tmp_path, mesh, STRICT)
    app = mesh.app("api")
    api = _mesh_proxy(mesh, tmp_path, "api", url, public, app=app.address)
    monkeypatch.setenv("STARMESH_JOIN_TOKEN", TOKEN)  # web's token comes from the environment
    web = _mesh_proxy(mesh, tmp_path, "web", url, public, token=False)
    for proxy in (api, web):
        proxy.wait_ready(DEADLINE)
    end = time.monotonic() + DEADLINE
    while (answer := _get(web.outbound, "api"))[0] != 200:  # until web has api's registered endpoint
        assert time.monotonic() < end, f"web never reached api over mTLS: {answer}"
        time.sleep(0.1)
    assert answer[1].get("x-app-name") == "api"  # authorized: the source is web, proven by its certificate
    assert _get(api.inbound, "api")[0] != 200  # strict: a plaintext caller is not served
