"""mTLS on the data plane (runtime/tls.py): inbound modes, SVID checks, origination, identity headers.

Real TLS on 127.0.0.1: a mesh root made by reconciler/ca.py, SVIDs issued from real CSRs
(and forged ones signed with the CA's key: expired, not yet valid, cA=true, two URI
SANs), another mesh's root. Each `Node` is what `starmesh proxy` wires for one service
(an Applier with mTLS origination, a mesh inbound listener, a plaintext outbound
listener, one UpstreamPool), in process, on uvloop like the proxy; the local app is an
aiohttp app that echoes the headers it received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import runpy
import ssl
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from starmesh.runtime.chain import OutboundMTLS
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.http.client import UpstreamPool
from starmesh.runtime.http.server import start_listener
from starmesh.runtime.message import FixedBody, Request, Response
from starmesh.runtime.tls import InboundPolicy, InboundTLS, MeshTLS

support = SimpleNamespace(**runpy.run_path(str(Path(__file__).with_name("mtls_support.py")), run_name="mtls_support"))
Node, echo_app, address, compile_policy = support.Node, support.echo_app, support.address, support.compile_policy

DEADLINE = 30.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a scenario on uvloop (as the proxy does), then check it left no task behind."""

    async def main() -> None:
        await asyncio.wait_for(coro, DEADLINE)
        for _ in range(5):
            await asyncio.sleep(0)
        leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leaked, f"tasks left running: {leaked}"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# -- the parts: an echo app, nodes, a raw client -----------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a client got: the status (None: refused, no HTTP answer), headers, body, the error."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str = ""

    def echoed(self) -> list[list[str]]:
        return list(json.loads(self.body)["headers"])


async def fetch(
    target: str,
    context: ssl.SSLContext | None = None,
    *,
    host: str = "reviews",
    path: str = "/",
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    requests: int = 1,
) -> list[Answer]:
    """`requests` GETs on one connection (TLS with `context`, else plaintext), answers in order."""
    hostname, port = target.rsplit(":", 1)
    answers: list[Answer] = []
    try:
        reader, writer = await asyncio.open_connection(hostname, int(port), ssl=context)
    except (OSError, ssl.SSLError) as exc:
        return [Answer(None, {}, b"", f"{type(exc).__name__}: {exc}")]
    try:
        for n in range(requests):
            last = n == requests - 1
            head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
            writer.write((head + ("Connection: close\r\n" if last else "") + "\r\n").encode())
            try:
                answers.append(await _read_answer(reader))
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as exc:
                answers.append(Answer(None, {}, b"", f"{type(exc).__name__}: {exc}"))
                break
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    return answers


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body)


async def one(target: str, context: ssl.SSLContext | None = None, **kw: Any) -> Answer:
    return (await fetch(target, context, **kw))[0]


# -- policies ------------------------------------------------------------------------------------


def reviews_policy(mode: str = "strict", authz: str = "enforce", extra: str = "") -> str:
    return f"""
mesh(name = "m", mtls = "{mode}")
service(name = "reviews", versions = ["v1"])
service(name = "productpage", versions = ["v1"])
service(name = "ratings", versions = ["v1"])
authorization("reviews", rules = [allow(sources = ["productpage"])], mode = "{authz}")
{extra}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The mesh CA with good SVIDs for three services, a foreign CA, and forged leaves."""
    base = tmp_path_factory.mktemp("pki")
    ca = support.MeshTestCA.create(base / "mesh")
    other = support.MeshTestCA.create(base / "other")
    now = datetime.now(UTC)
    return SimpleNamespace(
        ca=ca,
        reviews=ca.svid("reviews"),
        productpage=ca.svid("productpage"),
        ratings=ca.svid("ratings"),
        foreign=other.svid("productpage"),
        expired=ca.forged("productpage", name="expired", not_before=now - timedelta(hours=3),
                          not_after=now - timedelta(hours=1)),
        not_yet=ca.forged("productpage", name="not-yet", not_before=now + timedelta(hours=1),
                          not_after=now + timedelta(hours=3)),
        ca_leaf=ca.forged("productpage", name="ca-leaf", ca_flag=True),
        two_uris=ca.forged("productpage", name="two-uris", uris=(
            "spiffe://cluster.local/service/productpage", "spiffe://cluster.local/service/reviews")),
        forged_ok=ca.forged("productpage", name="forged-ok"),
    )


@asynccontextmanager
async def reviews_node(pki: SimpleNamespace, tmp_path: Path, policy: str) -> AsyncIterator[Any]:
    """The reviews service's proxy with `policy` applied, in front of an echo app."""
    async with AsyncExitStack() as stack:
        app = await stack.enter_async_context(echo_app())
        node = Node("reviews", support.Contexts(pki.ca.cert, pki.reviews), app)
        await node.start(pki.ca.cert)
        stack.push_async_callback(node.close)
        await node.apply(compile_policy(tmp_path / "reviews-policy", policy))
        yield node


def as_client(pki: SimpleNamespace, name: str | None) -> ssl.SSLContext:
    context: ssl.SSLContext = support.client_context(pki.ca.cert, None if name is None else getattr(pki, name))
    return context


# -- inbound: strict -------------------------------------------------------------------------------


def test_strict_admits_a_valid_svid_and_authorization_sees_the_proven_source(pki: SimpleNamespace, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict")) as node:
            allowed = await one(node.inbound, as_client(pki, "productpage"))
            assert allowed.status == 200, allowed
            # A valid SVID of ratings: authenticated, but the policy admits only productpage.
            denied = await one(node.inbound, as_client(pki, "ratings"))
            assert denied.status == 403 and denied.headers["x-starmesh-error"] == "denied", denied
            assert b"for ratings" in denied.body
            # The same profile signed outside issue_svid is as good (the check reads the cert, not who made it).
            assert (await one(node.inbound, as_client(pki, "forged_ok"))).status == 200
            assert node.tls.accepted["mtls"] == 3

    run(scenario())


def test_strict_refuses_plaintext_and_a_tls_client_without_a_certificate(pki: SimpleNamespace, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict")) as node:
            plaintext = await one(node.inbound)
            assert plaintext.status is None, plaintext
            anonymous = await one(node.inbound, as_client(pki, None))
            assert anonymous.status is None, anonymous
            assert node.tls.refused.get("plaintext") == 1
            assert node.tls.refused.get("handshake") == 1
            assert node.tls.accepted == {"mtls": 0, "plaintext": 0}

    run(scenario())


@pytest.mark.parametrize(
    ("credential", "why"),
    [
        ("foreign", "a certificate from another mesh's CA"),
        ("expired", "an expired certificate"),
        ("not_yet", "a certificate not valid yet"),
        ("ca_leaf", "a cA=true certificate"),
        ("two_uris", "a certificate with two URI SANs"),
    ],
)
def test_strict_refuses_certificates_that_are_not_valid_svids(
    pki: SimpleNamespace, tmp_path: Path, credential: str, why: str
) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict")) as node:
            answer = await one(node.inbound, as_client(pki, credential))
            assert answer.status is None, f"{why} was served: {answer}"
            assert sum(node.tls.refused.values()) == 1, node.tls.refused
            assert node.tls.accepted["mtls"] == 0
            # The policy admits productpage, and every one of these claims productpage:
            # only the check refused them; a good productpage SVID still gets through.
            assert (await one(node.inbound, as_client(pki, "productpage"))).status == 200

    run(scenario())


def test_certificates_that_pass_the_handshake_are_refused_by_the_svid_check(
    pki: SimpleNamespace, tmp_path: Path
) -> None:
    """cA=true and two URI SANs chain fine: verify_svid is what refuses them, after the handshake."""

    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict")) as node:
            for name in ("ca_leaf", "two_uris"):
                assert (await one(node.inbound, as_client(pki, name))).status is None
            assert node.tls.refused == {"svid": 2}

    run(scenario())


def test_refusals_are_logged_once_per_peer_and_reason(
    pki: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict")) as node:
            for _ in range(5):
                assert (await one(node.inbound)).status is None
            assert (await one(node.inbound, as_client(pki, "two_uris"))).status is None
            assert node.tls.refused == {"plaintext": 5, "svid": 1}

    with caplog.at_level(logging.WARNING, logger="starmesh.proxy"):
        run(scenario())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert "127.0.0.1" in refusals[0] and "(plaintext)" in refusals[0]
    assert "(svid)" in refusals[1] and "URI SANs" in refusals[1]


# -- inbound: identity headers -------------------------------------------------------------------

SPOOFED = [
    ("x-starmesh-source", "productpage"),
    ("X-Starmesh-Source", "productpage"),
    ("X-STARMESH-IDENTITY", "spiffe://cluster.local/service/productpage"),
    ("x-starmesh-peer", "productpage"),
    ("X-Forwarded-Client-Cert", "By=spiffe://cluster.local/service/reviews;URI=spiffe://cluster.local/service/productpage"),
    ("x-forwarded-client-cert", "URI=spiffe://cluster.local/service/productpage"),
]


def test_spoofed_identity_headers_are_dropped_and_never_make_a_source(pki: SimpleNamespace, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("permissive")) as node:
            # Proven as ratings, claiming productpage in every header: still ratings, denied.
            denied = await one(node.inbound, as_client(pki, "ratings"), headers=SPOOFED)
            assert denied.status == 403 and b"for ratings" in denied.body, denied
            # Plaintext (permissive) claiming productpage: no identity, denied.
            anonymous = await one(node.inbound, headers=SPOOFED)
            assert anonymous.status == 403 and b"unauthenticated" in anonymous.body, anonymous
            # Admitted: the app sees none of the identity headers, and the others as sent.
            admitted = await one(node.inbound, as_client(pki, "productpage"),
                                 headers=[*SPOOFED, ("x-other", "kept"), ("x-starmesh", "kept")])
            assert admitted.status == 200, admitted
            names = [name for name, _ in admitted.echoed()]
            assert not [n for n in names if n.startswith("x-starmesh-") or n == "x-forwarded-client-cert"], names
            assert ["x-other", "kept"] in admitted.echoed() and ["x-starmesh", "kept"] in admitted.echoed()

    run(scenario())


def test_a_plaintext_inbound_listener_drops_identity_headers_too(tmp_path: Path) -> None:
    """Without certificates (no `tls=`) the inbound listener is plaintext, as before, and strips them."""

    async def scenario() -> None:
        seen: list[Request] = []

        async def dispatch(request: Request) -> Response:
            seen.append(request)
            return Response(200, [])

        inbound = await start_listener("127.0.0.1", 0, dispatch, side="inbound")
        outbound = await start_listener("127.0.0.1", 0, dispatch, side="outbound")
        try:
            for listener in (inbound, outbound):
                answers = await fetch(address(listener), headers=[*SPOOFED, ("x-b", "1")], requests=2)
                assert [a.status for a in answers] == [200, 200]
        finally:
            for listener in (inbound, outbound):
                listener.close()
                await listener.wait_closed()
        names = [[n for n, _ in request.headers] for request in seen]
        for request_names in names[:2]:  # inbound: dropped, on every request of the connection
            assert not [n for n in request_names if n.startswith("x-starmesh-") or n == "x-forwarded-client-cert"]
            assert "x-b" in request_names
        for request_names in names[2:]:  # outbound (the local app's requests): left alone
            assert request_names.count("x-starmesh-source") == 2 and request_names.count("x-forwarded-client-cert") == 2
        assert all(request.source is None for request in seen)

    run(scenario())


def test_identity_headers_past_the_name_cache_are_dropped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names the reader's cache does not take (it is full) are checked as they come."""
    import starmesh.runtime.http.reader as reader_module

    monkeypatch.setattr(reader_module, "_NAME_CACHE_MAX", 0)
    fresh = [("X-Starmesh-Uncached-Source", "productpage"), ("x-starmesh-uncached-source", "a"), ("X-Uncached-Other", "1")]

    async def scenario() -> None:
        seen: list[Request] = []

        async def dispatch(request: Request) -> Response:
            seen.append(request)
            return Response(200, [])

        inbound = await start_listener("127.0.0.1", 0, dispatch, side="inbound")
        try:
            assert [a.status for a in await fetch(address(inbound), headers=fresh)] == [200]
        finally:
            inbound.close()
            await inbound.wait_closed()
        names = [n for n, _ in seen[0].headers]
        assert "x-uncached-other" in names and not [n for n in names if n.startswith("x-starmesh-")], names

    run(scenario())


def test_a_peer_that_says_nothing_or_stalls_its_handshake_is_closed_in_bounded_time(pki: SimpleNamespace) -> None:
    async def scenario() -> None:
        mesh = MeshTLS.from_ca_pem(support.Contexts(pki.ca.cert, pki.reviews), pki.ca.cert.read_bytes())
        tls = InboundTLS(mesh, lambda: InboundPolicy("strict", "cluster.local"), handshake_timeout=0.3)

        async def dispatch(request: Request) -> Response:
            return Response(200, [])

        listener = await start_listener("127.0.0.1", 0, dispatch, side="inbound", tls=tls)
        hostname, port = address(listener).rsplit(":", 1)
        try:
            for first in (b"", b"\x16\x03\x01"):  # silence; the start of a ClientHello, then silence
                reader, writer = await asyncio.open_connection(hostname, int(port))
                writer.write(first)
                try:
                    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""  # closed by the listener
                except ConnectionResetError:
                    pass
                finally:
                    writer.close()
            assert tls.refused == {"timeout": 1, "handshake": 1}, tls.refused
        finally:
            listener.close()
            await listener.wait_closed()

    run(scenario())


# -- inbound: permissive, audit, mode changes ----------------------------------------------------


def test_permissive_accepts_tls_with_identity_and_plaintext_without(pki: SimpleNamespace, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("permissive")) as node:
            tls = await fetch(node.inbound, as_client(pki, "productpage"), requests=3)
            assert [a.status for a in tls] == [200, 200, 200]
            plain = await one(node.inbound)
            assert plain.status == 403 and b"unauthenticated" in plain.body, plain
            assert node.tls.accepted == {"mtls": 1, "plaintext": 1}
            # A TLS client without a certificate proves nothing and is refused, not downgraded.
            assert (await one(node.inbound, as_client(pki, None))).status is None

    run(scenario())


def test_permissive_without_authorization_serves_plaintext(pki: SimpleNamespace, tmp_path: Path) -> None:
    policy = """
mesh(name = "m", mtls = "strict")
service(name = "reviews", versions = ["v1"], mtls = "permissive")
"""

    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, policy) as node:
            assert node.applier.current is not None
            assert node.applier.current.inbound_policy == InboundPolicy("permissive", "cluster.local")
            assert (await one(node.inbound)).status == 200
            assert (await one(node.inbound, as_client(pki, "ratings"))).status == 200

    run(scenario())


def test_audit_mode_lets_a_would_be_denial_through_and_counts_it(pki: SimpleNamespace, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict", authz="audit")) as node:
            answer = await one(node.inbound, as_client(pki, "ratings"))
            assert answer.status == 200, answer
            assert node.recorder.audit_denials == {("reviews", "ratings"): 1}
            assert (await one(node.inbound, as_client(pki, "productpage"))).status == 200
            assert node.recorder.audit_denials == {("reviews", "ratings"): 1}

    run(scenario())


def test_the_mode_is_read_per_connection_and_plaintext_ends_when_it_becomes_strict(
    pki: SimpleNamespace, tmp_path: Path
) -> None:
    open_policy = """
mesh(name = "m", mtls = "{mode}")
service(name = "reviews", versions = ["v1"])
"""

    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, open_policy.format(mode="disable")) as node:
            assert (await one(node.inbound)).status == 200
            # disable: no TLS at all; a ClientHello is not HTTP.
            assert (await one(node.inbound, as_client(pki, "productpage"))).status is None
            hostname, port = node.inbound.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(hostname, int(port))
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                assert (await _read_answer(reader)).status == 200
                await node.apply(compile_policy(tmp_path / "strict", open_policy.format(mode="strict")))
                # The open plaintext connection: refused from its next request on.
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                refused = await _read_answer(reader)
                assert refused.status == 403 and b"requires mTLS" in refused.body, refused
            finally:
                writer.close()
                await writer.wait_closed()
            assert (await one(node.inbound)).status is None
            assert (await one(node.inbound, as_client(pki, "ratings"))).status == 200

    run(scenario())


def test_before_any_config_both_are_accepted_and_answered_not_ready(pki: SimpleNamespace) -> None:
    async def scenario() -> None:
        async with echo_app() as app:
            node = Node("reviews", support.Contexts(pki.ca.cert, pki.reviews), app)
            await node.start(pki.ca.cert)
            try:
                assert node.tls.current() == InboundPolicy("permissive", "cluster.local")  # the root's trust domain
                for context in (None, as_client(pki, "productpage")):
                    answer = await one(node.inbound, context)
                    assert answer.status == 503 and answer.headers["x-starmesh-error"] == "not-ready", answer
                assert (await one(node.inbound, as_client(pki, "foreign"))).status is None
            finally:
                await node.close()

    run(scenario())


def test_a_rotated_server_certificate_is_used_from_the_next_connection(pki: SimpleNamespace, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with reviews_node(pki, tmp_path, reviews_policy("strict")) as node:
            fresh = pki.ca.svid("reviews", name="reviews-rotated")
            served = []
            for credential in (pki.reviews, fresh):
                node.contexts.use(credential)
                hostname, port = node.inbound.rsplit(":", 1)
                _, writer = await asyncio.open_connection(hostname, int(port), ssl=as_client(pki, "productpage"))
                served.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
                writer.close()
                await writer.wait_closed()
            expected = [c.cert.read_bytes() for c in (pki.reviews, fresh)]
            assert [ssl.PEM_cert_to_DER_cert(p.decode()) for p in expected] == served

    run(scenario())


# -- outbound: origination -----------------------------------------------------------------------


def test_outbound_originates_mtls_to_mesh_endpoints_and_checks_the_peer_names_the_service(
    pki: SimpleNamespace, tmp_path: Path
) -> None:
    """productpage calls reviews through its proxy; then reviews' endpoint is a ratings proxy."""

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            app = await stack.enter_async_context(echo_app())
            nodes = {}
            for service in ("productpage", "reviews", "ratings"):
                node = nodes[service] = Node(service, support.Contexts(pki.ca.cert, getattr(pki, service)), app)
                await node.start(pki.ca.cert)
                stack.push_async_callback(node.close)
            bundle = compile_policy(tmp_path / "mesh", reviews_policy("strict"))
            for node in nodes.values():
                await node.apply(bundle)
            caller = nodes["productpage"]
            await caller.apply(bundle, {"reviews": {"v1": [nodes["reviews"].inbound]}})
            answers = await fetch(caller.outbound, requests=3)
            assert [a.status for a in answers] == [200, 200, 200], answers
            assert caller.pool.connections() == 1  # one pooled mTLS connection carried all three
            # ratings calling reviews: its SVID is proven at reviews, which admits productpage only.
            await nodes["ratings"].apply(bundle, {"reviews": {"v1": [nodes["reviews"].inbound]}})
            denied = await one(nodes["ratings"].outbound)
            assert denied.status == 403 and denied.headers["x-starmesh-error"] == "denied", denied
            # reviews' endpoint now answers with ratings' SVID: the connect fails, nothing is sent.
            await caller.apply(bundle, {"reviews": {"v1": [nodes["ratings"].inbound]}})
            wrong = await one(caller.outbound)
            assert wrong.status == 503 and wrong.headers["x-starmesh-error"] == "upstream-unavailable", wrong
            assert b"'ratings'" in wrong.body and b"spiffe://cluster.local/service/reviews" in wrong.body
            assert nodes["ratings"].recorder.requests_total(direction="inbound") == 0  # nothing reached it
            assert nodes["reviews"].recorder.requests_total(direction="inbound") == 4  # 3 admitted, 1 denied

    run(scenario())


def test_outbound_to_static_endpoints_is_plaintext_unless_the_service_is_strict(
    pki: SimpleNamespace, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            app = await stack.enter_async_context(echo_app())
            nodes = {}
            for service in ("productpage", "reviews", "ratings"):
                node = nodes[service] = Node(service, support.Contexts(pki.ca.cert, getattr(pki, service)), app)
                await node.start(pki.ca.cert)
                stack.push_async_callback(node.close)
            policy = f"""
mesh(name = "m", mtls = "permissive")
service(name = "productpage", versions = ["v1"])
service(name = "reviews", versions = ["v1"])
service(name = "details", versions = ["v1"], endpoints = {{"v1": ["{app}"]}})
service(name = "ratings", versions = ["v1"], mtls = "strict", endpoints = {{"v1": ["{nodes['ratings'].inbound}"]}})
authorization("reviews", rules = [allow(sources = ["productpage"])])
authorization("ratings", rules = [allow(sources = ["productpage"])])
"""
            bundle = compile_policy(tmp_path / "mesh", policy)
            for node in nodes.values():
                await node.apply(bundle)
            caller = nodes["productpage"]
            await caller.apply(bundle, {"reviews": {"v1": [nodes["reviews"].inbound]}})
            # permissive + registered: mTLS (reviews admits the proven productpage only).
            assert (await one(caller.outbound, host="reviews")).status == 200
            # permissive + static: plaintext to the app itself (TLS to it would fail).
            details = await one(caller.outbound, host="details")
            assert details.status == 200, details
            # strict + static: mTLS, proven.
            assert (await one(caller.outbound, host="ratings")).status == 200
            assert nodes["reviews"].tls.accepted == {"mtls": 1, "plaintext": 0}
            assert nodes["ratings"].tls.accepted == {"mtls": 1, "plaintext": 0}

    run(scenario())


def test_tls_and_plaintext_connections_to_one_endpoint_are_pooled_apart(pki: SimpleNamespace) -> None:
    async def scenario() -> None:
        async with echo_app() as app:
            node = Node("reviews", support.Contexts(pki.ca.cert, pki.reviews), app)
            await node.start(pki.ca.cert)
            pool = UpstreamPool()
            mesh = MeshTLS.from_ca_pem(support.Contexts(pki.ca.cert, pki.productpage), pki.ca.cert.read_bytes())
            try:
                await node.apply(_open_bundle(pki))
                mtls = OutboundMTLS(pool, mesh, Endpoints())
                tls_pool = mtls.pool_for("reviews", "strict", "cluster.local")
                assert mtls.pool_for("reviews", "strict", "cluster.local") is tls_pool  # made once
                assert mtls.pool_for("reviews", "disable", "cluster.local") is pool
                for send in (tls_pool.send, pool.send, tls_pool.send, pool.send):
                    request = Request("GET", "/", None, [("host", "reviews")], FixedBody(b""), service="reviews")
                    response = await send(node.inbound, request)
                    await response.body.read()
                    response.body.close()
                    assert response.status == 200
                assert pool.connections() == 2 and pool.idle(node.inbound) == 1
                assert node.tls.accepted == {"mtls": 1, "plaintext": 1}
                assert pool.active(node.inbound) == 0
            finally:
                await pool.close()
                await node.close()

    run(scenario())


def _open_bundle(pki: SimpleNamespace) -> bytes:
    """A permissive mesh declaring reviews, without authorization."""
    policy = 'mesh(name = "m", mtls = "permissive")\nservice(name = "reviews", versions = ["v1"])\n'
    data: bytes = compile_policy(pki.ca.directory / "open-policy", policy)
    return data


def test_tls_pools_nobody_uses_any_more_go_away() -> None:
    """One TLS pool per expected identity, held by the routes using it: old bundles' ones do not pile up."""
    import gc

    async def scenario() -> None:
        pool = UpstreamPool()

        def refuse(endpoint: str, transport: asyncio.BaseTransport) -> None:
            raise AssertionError("never connects")

        held = [pool.originating(f"spiffe://cluster.local/service/s{n}", ssl.create_default_context, refuse)
                for n in range(100)]
        assert pool.originating("spiffe://cluster.local/service/s7", ssl.create_default_context, refuse) is held[7]
        del held
        gc.collect()
        assert len(pool._originating) == 0
        await pool.close()

    run(scenario())
