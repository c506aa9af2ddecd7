"""Mesh identity end to end (issue 5): real processes, a real CA, real certificates.

    starmesh ca init ─► ca.crt, ca.key
    starmesh control-plane --ca DIR --join-token T ─┬─ HTTPS, POST /v1/certificates
                                                    └─ releases to certified proxies only
    front, intruder ──(their proxies, --ca-cert --join-token)──mTLS──► app's proxy ──► app

The policy is `mesh(mtls = "strict")` and `authorization("app", allow(sources = ["front"]))`
in enforce mode: the source is the service the caller's certificate names, never a header.
Every test polls for a condition with a generous deadline; none times anything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cryptography import x509

import pytest

pytestmark = pytest.mark.slow

Fleet = Any  # tests/system/conftest.py's Fleet (a conftest cannot be imported in importlib mode)

TD = "mesh.test"
TOKEN = "join-token-for-the-system-tests-0123"
DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""

POLICY = f"""\
mesh(name = "shop", trust_domain = "{TD}", mtls = "strict")

service(name = "front", versions = ["v1"])
service(name = "intruder", versions = ["v1"])
service(name = "app", versions = ["v1"])

authorization("app", rules = [allow(sources = ["front"])])
"""

SPOOFED = {
    "x-starmesh-source": "front",
    "X-Forwarded-Client-Cert": f"By=spiffe://{TD}/service/app;URI=spiffe://{TD}/service/front",
}


def serial(proxy: Any) -> int:
    """The serial of the workload certificate the proxy keeps in its state dir."""
    pem = (proxy.state_dir / "workload.crt").read_bytes()
    return x509.load_pem_x509_certificate(pem).serial_number


def uri_san(proxy: Any) -> list[str]:
    cert = x509.load_pem_x509_certificate((proxy.state_dir / "workload.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


def mesh_of(fleet: Fleet, lifetime: str | None = None, services: tuple[str, ...] = ("front", "intruder")) -> dict[str, Any]:
    """CA, control plane, the app and its proxy, and a proxy per caller service; all ready."""
    fleet.commit(POLICY)
    ca = fleet.ca(TD)
    cp = fleet.control_plane(ca=ca, join_token=TOKEN, cert_lifetime=lifetime)
    app = fleet.mesh.app("app")
    parts: dict[str, Any] = {"cp": cp, "app": app}
    parts["app-proxy"] = fleet.proxy(cp, "app", app=app.address, join_token=TOKEN, wait_ready=False)
    for name in services:
        parts[name] = fleet.proxy(cp, name, join_token=TOKEN, wait_ready=False)
    for name in ("app-proxy", *services):
        parts[name].wait_ready(DEADLINE)
    return parts


def reach_app(fleet: Fleet, h: Any, caller: Any) -> Any:
    """Poll until `caller` gets an answer from app other than `no endpoint yet`; that answer."""

    def answered() -> Any:
        reply = h.call(caller.outbound, "/echo", host="app")
        return reply if reply.status == 200 or reply.error == "denied" else None

    return fleet.wait_until(answered, f"{caller.service} → app answered by app's proxy", DEADLINE)


def echoed_headers(reply: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in reply.json()["headers"]:
        found.setdefault(name.lower(), []).append(value)
    return found


def test_the_source_is_the_certificate_not_the_headers(fleet: Fleet, h: Any) -> None:
    parts = mesh_of(fleet)
    app, front, intruder, app_proxy = parts["app"], parts["front"], parts["intruder"], parts["app-proxy"]
    for proxy, service in ((front, "front"), (intruder, "intruder"), (app_proxy, "app")):
        assert uri_san(proxy) == [f"spiffe://{TD}/service/{service}"]
        assert any(line.startswith("starmesh proxy: mesh identity ") for line in proxy.printed), proxy.printed
        assert not any("links are plaintext" in line for line in proxy.printed)

    # front is allowed: app answers, and sees the request.
    reply = reach_app(fleet, h, front)
    assert reply.status == 200 and reply.app == "app", (reply.status, reply.headers, reply.body)
    before = app.count("GET /echo")
    assert before >= 1

    # intruder is not: 403 `denied` from app's proxy; app never sees it.
    reply = reach_app(fleet, h, intruder)
    assert (reply.status, reply.error) == (403, "denied"), (reply.status, reply.headers, reply.body)
    assert reply.app is None
    assert app.count("GET /echo") == before

    # Spoofed identity headers from intruder change nothing.
    for _ in range(3):
        reply = h.call(intruder.outbound, "/echo", host="app", headers=SPOOFED)
        assert (reply.status, reply.error) == (403, "denied"), (reply.status, reply.headers, reply.body)
    assert app.count("GET /echo") == before

    # ...and the same headers sent by front never reach the app: stripped on app's inbound.
    reply = h.call(front.outbound, "/echo", host="app", headers={"x-starmesh-source": "intruder", **SPOOFED})
    assert reply.status == 200 and reply.app == "app"
    seen = echoed_headers(reply)
    assert "x-forwarded-client-cert" not in seen, seen
    assert not [name for name in seen if name.startswith("x-starmesh-")], seen

    # A plaintext request straight to app's inbound is refused (strict): no answer, the app never sees it.
    count = app.count("GET /echo")
    received, closed = h.raw_exchange(app_proxy.inbound, b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n")
    assert closed and h.status_of(received) != 200, received
    assert app.count("GET /echo") == count
    metrics = h.call(app_proxy.admin, "/metrics").body.decode()
    assert 'starmesh_inbound_connections_refused_total{reason="plaintext"}' in metrics, metrics


def test_certificates_rotate_under_continuous_traffic_without_a_failed_request(fleet: Fleet, h: Any) -> None:
    lifetime = 10.0  # the shortest --cert-lifetime the CLI allows: renewed at half-life, every ~5 s
    parts = mesh_of(fleet, lifetime=f"{lifetime:g}s", services=("front",))
    front, app_proxy = parts["front"], parts["app-proxy"]
    assert reach_app(fleet, h, front).status == 200

    serials: dict[str, set[int]] = {"front": {serial(front)}, "app": {serial(app_proxy)}}
    with fleet.traffic(h, front) as outcomes:
        end = time.monotonic() + 2 * lifetime  # about two lifetimes of traffic, then until both rotated twice
        deadline = end + DEADLINE
        while time.monotonic() < end or min(len(s) for s in serials.values()) < 3:
            assert time.monotonic() < deadline, f"the certificates did not rotate: {serials}"
            serials["front"].add(serial(front))
            serials["app"].add(serial(app_proxy))
            time.sleep(0.2)
    assert outcomes["ok"] > 0 and set(outcomes) == {"ok"}, outcomes
    # After the rotations, new connections still prove front (a fresh client, a fresh connection).
    assert h.call(front.outbound, "/echo", host="app").status == 200
    for proxy in (front, app_proxy):
        metrics = h.call(proxy.admin, "/metrics").body.decode()
        gauge = [line for line in metrics.splitlines() if line.startswith("starmesh_certificate_expiry_seconds ")]
        assert gauge and float(gauge[0].split()[1]) > 0, metrics


def test_a_proxy_restarted_with_the_control_plane_down_serves_mtls_from_what_it_kept(fleet: Fleet, h: Any) -> None:
    parts = mesh_of(fleet, services=("front",))
    cp, front = parts["cp"], parts["front"]
    assert reach_app(fleet, h, front).status == 200
    kept = (front.state_dir / "workload.crt").read_bytes()
    assert front.stop() == 0
    cp.process.stop()

    again = fleet.proxy(cp, "front", state=front.state_dir, join_token=TOKEN, wait_ready=False)
    again.wait_ready(DEADLINE)  # from last-known-good, with the certificate kept in the state dir
    assert f"starmesh proxy: mesh identity spiffe://{TD}/service/front" in "\n".join(again.printed)
    assert again.config()["origin"] == "last-known-good"
    reply = h.call(again.outbound, "/echo", host="app")
    assert reply.status == 200 and reply.app == "app", (reply.status, reply.headers, reply.body)
    assert (front.state_dir / "workload.crt").read_bytes() == kept


def test_a_wrong_join_token_never_gets_a_certificate_and_never_serves(fleet: Fleet, h: Any, tmp_path: Path) -> None:
    parts = mesh_of(fleet, services=())
    cp, app, app_proxy = parts["cp"], parts["app"], parts["app-proxy"]
    log = tmp_path / "wrong-token.log"
    wrong = fleet.proxy(cp, "front", join_token="not-the-mesh-join-token", wait_ready=False, log=log)
    wrong.read_status()
    assert wrong.status.startswith("not ready: ") and "waiting for the workload certificate" in wrong.status

    def refused() -> str | None:
        reply = h.call(wrong.admin, "/readyz")
        text = reply.body.decode()
        return text if reply.status == 503 and "last error" in text else None

    why = str(fleet.wait_until(refused, "/readyz naming the refusal"))
    assert "refused the join token (HTTP 401" in why, why
    assert "refused the join token" in log.read_text(), log.read_text()[-2000:]
    assert not (wrong.state_dir / "workload.crt").exists()

    reply = h.call(wrong.outbound, "/", host="app")
    assert (reply.status, reply.error) == (503, "not-ready"), (reply.status, reply.headers, reply.body)
    before = app.count("GET /")
    received, _ = h.raw_exchange(wrong.inbound, b"GET / HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
    assert h.status_of(received) == 503 and b"not-ready" in received, received
    assert app.count("GET /") == before
    assert app_proxy.ready()
    assert wrong.process.popen.poll() is None  # it keeps trying, with backoff
