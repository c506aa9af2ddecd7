"""Fixtures for whole-system tests: a Git policy repo, a real control plane, proxies in the
control-plane form, and test apps, all real processes on 127.0.0.1.

    git commit ─► starmesh control-plane ─► long-poll ─► starmesh proxy (×N) ─► test apps
                    (watches the repo)                    (--control-plane URL --trust KEY)

The process, app and proxy helpers and the `mesh` and `h` fixtures come from
tests/runtime/e2e/conftest.py (loaded by path: conftest modules cannot be imported in
importlib mode); `fleet` adds the Git repo, the signing key, the control plane and
control-plane-form proxies. Everything started is stopped, and asserted gone, when the
test ends.

Mesh identity (issue 5): `fleet.ca()` runs `starmesh ca init`; `control_plane(ca=DIR,
join_token=T)` serves HTTPS from that CA (the `ControlPlane` then talks to it trusting
DIR/ca.crt); `proxy(..., join_token=T)` against such a control plane gets `--ca-cert`
and `--join-token`, so it asks for its workload certificate and does mTLS.
"""

from __future__ import annotations

import json
import runpy
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

E2E_CONFTEST = Path(__file__).resolve().parents[1] / "runtime" / "e2e" / "conftest.py"
support = SimpleNamespace(**runpy.run_path(str(E2E_CONFTEST), run_name="starmesh_e2e_support"))
Process = support.Process
Proxy = support.Proxy
Mesh = support.Mesh
mesh = support.mesh  # the fixture: apps and proxies, all stopped (and asserted gone) at the end
h = support.h  # the client helpers fixture: call, many, send_all, poll_until, ...

POLICY = """\
mesh(name = "shop", mtls = "disable"{rollout})

service(name = "front", versions = ["v1"])
service(name = "app", versions = ["v1", "v2"])

http_route("app", rules = [
    rule(backends = {{"v1": {v1}, "v2": {v2}}}),
])
"""


def policy(v1: int = 100, v2: int = 0, rollout: str = "") -> str:
    """The fleet's policy: `app` split v1/v2 by weight; `rollout` is `mesh(rollout = ...)`'s value."""
    return POLICY.format(v1=v1, v2=v2, rollout=f", rollout = {rollout}" if rollout else "")


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=starmesh tests", "-c", "user.email=tests@example.invalid", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


def get_json(url: str, timeout: float = 10.0, context: ssl.SSLContext | None = None) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
        data = json.loads(answer.read())
    assert isinstance(data, dict)
    return data


def wait_until(check: object, what: str, deadline: float = 30.0, interval: float = 0.05) -> object:
    """Poll `check()` until it returns something truthy; fail saying `what` if it never does."""
    assert callable(check)
    end = time.monotonic() + deadline
    last: object = None
    while time.monotonic() < end:
        try:
            last = check()
        except (OSError, urllib.error.URLError, ValueError) as exc:  # not up yet, mid-restart
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what}: not within {deadline}s (last: {last!r})")


@dataclass
class ControlPlane:
    process: Process
    address: str = ""
    ca_cert: Path | None = None
    """With --ca: the mesh root (DIR/ca.crt); the API is HTTPS with a certificate from it."""

    @property
    def url(self) -> str:
        return f"{'http' if self.ca_cert is None else 'https'}://{self.address}"

    def context(self) -> ssl.SSLContext | None:
        """For urllib: None over HTTP, else trusting only the mesh root (the cert names 127.0.0.1)."""
        return None if self.ca_cert is None else ssl.create_default_context(cafile=str(self.ca_cert))

    def status(self) -> dict[str, object]:
        return get_json(f"{self.url}/v1/status", context=self.context())

    def release(self) -> dict[str, object] | None:
        release = self.status()["release"]
        assert release is None or isinstance(release, dict)
        return release


class Fleet:
    """A policy repo, a signing key, a control plane and control-plane-form proxies."""

    def __init__(self, mesh: Mesh, tmp_path: Path) -> None:
        self.mesh = mesh
        self.tmp_path = tmp_path
        self.repo = tmp_path / "policy-repo"
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        keys = tmp_path / "keys"
        out = subprocess.run(
            [sys.executable, "-m", "starmesh.cli", "keygen", "--out", str(keys)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        self.key = keys / "signing.key"
        self.public = keys / "signing.pub"
        self.control_planes: list[ControlPlane] = []
        self.cp_state = tmp_path / "cp-state"

    def commit(self, text: str, message: str = "policy", files: dict[str, str] | None = None) -> str:
        (self.repo / "mesh.star").write_text(text)
        for name, content in (files or {}).items():
            (self.repo / name).write_text(content)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.repo, "rev-parse", "HEAD")

    def ca(self, trust_domain: str, directory: Path | None = None) -> Path:
        """`starmesh ca init --trust-domain TD --out DIR`: the mesh CA's directory (ca.crt, ca.key)."""
        directory = directory or self.tmp_path / "ca"
        argv = [sys.executable, "-m", "starmesh.cli", "ca", "init", "--trust-domain", trust_domain, "--out", str(directory)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return directory

    def control_plane(
        self,
        extra: Sequence[str] = (),
        key: Path | None = None,
        listen: str = "127.0.0.1:0",
        *,
        ca: Path | None = None,
        join_token: str | None = None,
        cert_lifetime: str | None = None,
        state_dir: Path | None = None,
    ) -> ControlPlane:
        """A control plane on the fleet's repo; with `ca` (and `join_token`) it issues workload
        certificates. `state_dir`: its own (a replica of several, `--store`), else the fleet's."""
        if ca is not None:
            extra = [*extra, "--ca", str(ca)]
        if join_token is not None:
            extra = [*extra, "--join-token", join_token]
        if cert_lifetime is not None:
            extra = [*extra, "--cert-lifetime", cert_lifetime]
        argv = [
            sys.executable, "-m", "starmesh.cli", "control-plane",
            "--repo", str(self.repo), "--branch", "main", "--key", str(key or self.key),
            "--state-dir", str(state_dir or self.cp_state), "--listen", listen,
            "--poll-interval", "1", "--proxy-ttl", "3",
            *extra,
        ]  # fmt: skip
        cp = ControlPlane(self.mesh.start("control-plane", argv), ca_cert=None if ca is None else ca / "ca.crt")
        listening = cp.process.first_line(lambda line: line.startswith("listening "), "'listening' line")
        cp.address = listening.removeprefix("listening ").strip()
        self.control_planes.append(cp)
        return cp

    @staticmethod
    @contextmanager
    def traffic(h: Any, front: Any, path: str = "/") -> Iterator[Counter[str]]:
        """Requests through `front`'s outbound listener to `app`, 8 at a time, 4 at once, for
        as long as the block runs; the outcomes ("ok", or "<status> <error>") counted."""
        outcomes: Counter[str] = Counter()
        stop = threading.Event()

        def send() -> None:
            while not stop.is_set():
                for reply in h.many(front.outbound, 8, path=path, host="app", concurrency=4):
                    outcomes["ok" if reply.status == 200 else f"{reply.status} {reply.error}"] += 1

        sender = threading.Thread(target=send, name="traffic")
        sender.start()
        try:
            yield outcomes
        finally:
            stop.set()
            sender.join(60)
        assert not sender.is_alive(), "the traffic thread did not stop"

    # Helpers as attributes: test modules cannot import a conftest in importlib mode.
    policy = staticmethod(policy)
    git = staticmethod(git)
    wait_until = staticmethod(wait_until)

    def proxy(
        self,
        cp: ControlPlane | Sequence[ControlPlane],
        service: str,
        version: str = "v1",
        app: str = "127.0.0.1:9",
        trust: Sequence[Path] | None = None,
        state: Path | None = None,
        wait_ready: bool = True,
        *,
        join_token: str | None = None,
        ca_cert: Path | None = None,
        log: Path | None = None,
    ) -> Proxy:
        """A control-plane-form proxy; waits until it is ready unless told not to.

        Against a control plane with --ca it gets `--ca-cert` (`ca_cert`, else that plane's
        root) and `--join-token` when `join_token` is given. `log`: a file for its stderr
        (then its lines are its stdout alone)."""
        planes = [cp] if isinstance(cp, ControlPlane) else list(cp)
        extra = [arg for plane in planes for arg in ("--control-plane", plane.url)]
        extra += [arg for key in trust or [self.public] for arg in ("--trust", str(key))]
        root = ca_cert or planes[0].ca_cert
        if root is not None:
            extra += ["--ca-cert", str(root)]
        if join_token is not None:
            extra += ["--join-token", join_token]
        proxy = self.mesh.start_proxy(service, version, app, None, extra=extra, state=state, log=log)
        if wait_ready:
            proxy.wait_ready(30.0)
        return proxy


@pytest.fixture
def fleet(mesh: Mesh, tmp_path: Path) -> Fleet:
    return Fleet(mesh, tmp_path)
