"""`starmesh control-plane`: its input checks (exit 2) and the real process.

The process test starts `.venv/bin/starmesh control-plane` in its own session (the
`control_planes` fixture of tests/cli/conftest.py), reads `listening HOST:PORT` and
`ready ...` from its stdout, talks HTTP to it, commits to the repository it follows, and
stops it with SIGTERM (exit 0); the fixture stops whatever is left. Waits poll with a
deadline; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from starmesh.bundle.keys import generate_keypair
from starmesh.cli.control_plane import parse_ttl
from starmesh.cli.main import main

DEADLINE = 30.0
TOKEN = "join-token-0123456789abcdef"

POLICY = """\
mesh(name = "shop", mtls = "disable")
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [rule(backends = {{"{to}": 100}})])
request_test(name = "default route", service = "api", backends = "{to}")
"""


@pytest.fixture
def repo(tmp_path: Path, h: Any) -> Path:
    return h.make_repo(tmp_path / "policy")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    private, _ = generate_keypair(tmp_path / "keys")
    return private


# -- input checks ----------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner(env={"NO_COLOR": "1"}).invoke(main, ["control-plane", *args])


def base(repo: Path, key: Path, state: Path) -> list[str]:
    return ["--repo", str(repo), "--key", str(key), "--state-dir", str(state), "--listen", "127.0.0.1:0"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ca", "ca"], "--ca needs --join-token TOKEN"),
        (["--join-token", "t" * 16], "--join-token needs --ca DIR"),
        (["--cert-lifetime", "1h"], "--cert-lifetime needs --ca DIR and --join-token"),
        (["--store", "http://127.0.0.1:2379"], "--store: 'http://127.0.0.1:2379' is not an etcd URL"),
        (["--store", "etcd://127.0.0.1"], "--store: 'etcd://127.0.0.1': '127.0.0.1' is not HOST:PORT"),
        (["--store", "etcd://127.0.0.1:2379", "--replica-id", "a b"], "--replica-id 'a b': use 1-64 letters"),
        (["--store", "etcd://127.0.0.1:2379", "--advertise-url", "ftp://x:1"], "--advertise-url 'ftp://x:1': give"),
        (["--replica-id", "r1"], "--replica-id need --store"),
        (["--listen", "localhost"], "--listen: 'localhost' is not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "--listen: '127.0.0.1:99999': port 99999"),
        (["--branch", "a..b"], "--branch: 'a..b' is not a valid branch name"),
        (["--release-ttl", "7 days"], "--release-ttl: '7 days' is not a duration like 7d"),
        (["--release-ttl", "1s"], "--release-ttl: '1s' is outside 10s..365d"),
        (["--subdir", "../elsewhere"], "--subdir '../elsewhere' must be a path inside the repository"),
        (["--entry", "/etc/mesh.star"], "--entry '/etc/mesh.star' must be a path inside the repository"),
        (["--repo", "gopher://x/y"], "--repo gopher://x/y: unsupported URL scheme 'gopher'"),
    ],
)
def test_bad_options_exit_2_saying_why(tmp_path: Path, repo: Path, key: Path, extra: list[str], message: str) -> None:
    result = invoke(*base(repo, key, tmp_path / "state"), *extra)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"starmesh: error: {message}"), result.stderr


def test_a_missing_or_bad_key_exits_2(tmp_path: Path, repo: Path) -> None:
    missing = invoke(*base(repo, tmp_path / "nope.key", tmp_path / "state"))
    assert missing.exit_code == 2
    assert "--key" in missing.stderr and "no such file" in missing.stderr and "starmesh keygen" in missing.stderr
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    bad = invoke(*base(repo, garbage, tmp_path / "state"))
    assert bad.exit_code == 2
    assert "not a PEM PKCS#8 private key" in bad.stderr
    _, public = generate_keypair(tmp_path / "other")
    wrong = invoke(*base(repo, public, tmp_path / "state"))
    assert wrong.exit_code == 2 and "--key" in wrong.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_exits_2(tmp_path: Path, repo: Path, key: Path) -> None:
    key.chmod(0)
    result = invoke(*base(repo, key, tmp_path / "state"))
    assert result.exit_code == 2 and "cannot read key file" in result.stderr


def test_a_repo_that_is_not_there_or_not_git_exits_2(tmp_path: Path, key: Path) -> None:
    missing = invoke(*base(tmp_path / "nowhere", key, tmp_path / "state"))
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    not_git = invoke(*base(plain, key, tmp_path / "state"))
    assert not_git.exit_code == 2 and "not a Git repository" in not_git.stderr


def test_a_state_dir_that_cannot_be_created_exits_2(tmp_path: Path, repo: Path, key: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way\n")
    result = invoke(*base(repo, key, blocker / "state"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"starmesh: error: --state-dir {blocker / 'state'}: cannot create it")


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    from starmesh.reconciler.ca import init_ca

    init_ca("cluster.local", tmp_path / "ca")
    return tmp_path / "ca"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--join-token", "short"], "--join-token is 5 characters; give at least 16"),
        (["--join-token", "has spaces in the token"], "--join-token must be visible ASCII without spaces"),
        (["--join-token", TOKEN, "--cert-lifetime", "forever"], "--cert-lifetime: 'forever' is not a duration"),
        (["--join-token", TOKEN, "--cert-lifetime", "1s"], "--cert-lifetime: '1s' is outside 10s..365d"),
    ],
)
def test_bad_identity_options_exit_2_saying_why(
    tmp_path: Path, repo: Path, key: Path, ca: Path, extra: list[str], message: str
) -> None:
    result = invoke(*base(repo, key, tmp_path / "state"), "--ca", str(ca), *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"starmesh: error: {message}"), result.stderr


def test_a_ca_dir_that_does_not_load_exits_2_with_the_reason(tmp_path: Path, repo: Path, key: Path, ca: Path) -> None:
    missing = invoke(*base(repo, key, tmp_path / "state"), "--ca", str(tmp_path / "nowhere"), "--join-token", TOKEN)
    assert missing.exit_code == 2
    assert missing.stderr.startswith(f"starmesh: error: --ca: {tmp_path / 'nowhere' / 'ca.crt'}: no such file")
    assert "starmesh ca init" in missing.stderr
    (ca / "ca.key").write_text("not a key\n")
    broken = invoke(*base(repo, key, tmp_path / "state"), "--ca", str(ca), "--join-token", TOKEN)
    assert broken.exit_code == 2
    assert f"--ca: {ca / 'ca.key'}: not a PEM PKCS#8 private key" in broken.stderr


def test_help_names_every_option_and_shows_an_example() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--repo", "--branch", "--key", "--state-dir", "--listen", "--subdir", "--entry",
                   "--poll-interval", "--proxy-ttl", "--release-ttl", "--ca", "--join-token", "--cert-lifetime",
                   "--store", "--replica-id", "--advertise-url", "--leader-ttl", "--store-ca", "--store-cert", "--store-key"):
        assert option in result.stdout
    assert "Example:" in result.stdout and "starmesh control-plane --repo" in result.stdout


@pytest.mark.parametrize(
    ("text", "ttl"),
    [("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)), ("90s", timedelta(seconds=90))],
)
def test_release_ttl_durations(text: str, ttl: timedelta) -> None:
    assert parse_ttl(text) == ttl


# -- the process -----------------------------------------------------------------------------


def test_the_process_serves_releases_follows_commits_and_stops_on_sigterm(
    tmp_path: Path, repo: Path, key: Path, control_planes: Any, h: Any
) -> None:
    first = h.commit(repo, POLICY.format(to="v1"))
    cp = control_planes.start(base(repo, key, tmp_path / "state") + ["--poll-interval", "3600"], log=tmp_path / "cp.log")
    listening, ready = cp.first_lines(2)
    assert listening.startswith("listening 127.0.0.1:")
    assert cp.wait_listening() == listening.removeprefix("listening ")
    assert ready.startswith("ready release 1 sha256:"), ready
    assert cp.get("/healthz")[0] == 200 and cp.get("/readyz")[0] == 200
    body = cp.status()
    assert body["release"]["version"] == 1 and body["release"]["commit"] == first
    code, envelope = cp.get("/v1/release?after=0")
    assert code == 200 and json.loads(envelope)["payloadType"] == "application/vnd.starmesh.release+json"
    second = h.commit(repo, POLICY.format(to="v2"))
    cp.wait_status(lambda d: d["release"]["commit"] == second, f"a release of {second}")
    assert cp.status()["release"]["version"] == 2
    cp.process.send_signal(signal.SIGTERM)
    assert cp.process.popen.wait(DEADLINE) == 0
    assert (tmp_path / "state" / "store").is_dir()


def test_the_process_says_not_ready_and_stops_on_sigint(
    tmp_path: Path, repo: Path, key: Path, control_planes: Any, h: Any
) -> None:
    h.commit(repo, 'mesh(name = "shop"\n')
    cp = control_planes.start(base(repo, key, tmp_path / "state"), log=tmp_path / "cp.log")
    listening, status = cp.first_lines(2)
    assert listening.startswith("listening ")
    assert status.startswith("not ready: no release yet: commit ")
    cp.process.send_signal(signal.SIGINT)
    assert cp.process.popen.wait(DEADLINE) == 0


def curl(*args: str) -> tuple[int, str]:
    """`curl ARGS` (a real outside client, never through a proxy): the HTTP status and the body."""
    done = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(DEADLINE), "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=DEADLINE + 10,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    body, _, code = done.stdout.rpartition("\n")
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (CI installs it)")
def test_the_process_with_a_ca_serves_https_and_issues_certificates(
    tmp_path: Path, repo: Path, key: Path, ca: Path, control_planes: Any, h: Any
) -> None:
    h.commit(repo, POLICY.format(to="v1"))
    args = base(repo, key, tmp_path / "state") + ["--ca", str(ca), "--join-token", TOKEN, "--cert-lifetime", "2h"]
    cp = control_planes.start(args, log=tmp_path / "cp.log")
    listening, ready = cp.first_lines(2)
    assert listening.startswith("listening 127.0.0.1:") and ready.startswith("ready release 1 "), ready
    url = "https://" + listening.removeprefix("listening ")
    trust = ["--cacert", str(ca / "ca.crt")]
    assert curl(*trust, url + "/readyz") == (200, "ready\n")
    assert "https://" in (tmp_path / "cp.log").read_text()

    # A proxy's first certificate, asked for with the join token, then used as its client certificate.
    workload_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://cluster.local/service/api")]),
            critical=False,
        )
        .sign(workload_key, hashes.SHA256())
    )
    request = json.dumps({"service": "api", "csr": csr.public_bytes(serialization.Encoding.PEM).decode()})
    post = [*trust, "-H", "content-type: application/json", "--data-binary", request, url + "/v1/certificates"]
    code, refused = curl(*post)
    assert code == 401 and "join token" in json.loads(refused)["error"]
    code, issued = curl("-H", f"authorization: Bearer {TOKEN}", *post)
    assert code == 200, issued
    certificate = x509.load_pem_x509_certificate(json.loads(issued)["certificate"].encode())
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == timedelta(hours=2, minutes=1)
    (tmp_path / "workload.crt").write_text(json.loads(issued)["certificate"])
    (tmp_path / "workload.key").write_bytes(
        workload_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    client = ["--cert", str(tmp_path / "workload.crt"), "--key", str(tmp_path / "workload.key")]
    code, body = curl(*trust, url + "/v1/release?after=0&wait=0")
    assert code == 401 and "no client certificate was presented" in json.loads(body)["error"]
    code, body = curl(*trust, *client, url + "/v1/release?after=0&wait=0")
    assert code == 200 and json.loads(body)["payloadType"] == "application/vnd.starmesh.release+json"
    beat = json.dumps({"service": "api", "version": "v1", "address": "127.0.0.1:9081"})
    code, body = curl(*trust, *client, "-H", "content-type: application/json", "--data-binary", beat, url + "/v1/proxies/api-1")
    assert code == 200, body
    status = CliRunner().invoke(main, ["status", "--control-plane", url, "--ca-cert", str(ca / "ca.crt"), "--format", "json"])
    assert status.exit_code == 0, status.output
    assert [p["id"] for p in json.loads(status.stdout)["proxies"]] == ["api-1"]

    cp.process.send_signal(signal.SIGTERM)
    assert cp.process.popen.wait(DEADLINE) == 0
