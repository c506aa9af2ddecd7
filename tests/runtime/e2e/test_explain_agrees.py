"""End to end: `starmesh explain`, the proxy's admin `/explain` and the running proxy agree.

One bundle, one set of requests. For each request: (a) `starmesh explain --format json`
run as a process on the policy tree the bundle was compiled from, (b) the admin
`/explain` of a `starmesh proxy` running that bundle, byte for byte the same document,
and (c) what that proxy does with the request sent through its listeners: the version
that answered (every rule sends 100% to one version, so the destination is
deterministic), or the status and `x-starmesh-error` reason the proxy answered itself
(404 no-route, a fault's 503, 403 denied). Authorization runs on the receiving side, in
the plaintext `--bundle` form without a caller identity: the allow rules name methods
and paths, which need none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

pytestmark = pytest.mark.slow

STARMESH = Path(sys.executable).with_name("starmesh")

POLICY = """
mesh(name = "agree", mtls = "disable")

service(name = "web")
service(name = "audited")
service(name = "details")
service(name = "reviews", versions = ["v1", "v2", "v3"])

http_route("reviews", rules = [
    rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100}),
    rule(
        match = [match(path_prefix = "/admin/")],
        fault = fault(abort_status = 503, abort_percent = 100),
        backends = {"v1": 100},
    ),
    rule(match = [match(path_prefix = "/api/", methods = ["GET"])], backends = {"v3": 100}),
    rule(match = [match(query = {"debug": present()})], backends = {"v2": 100}),
    rule(match = [match(path_exact = "/")], backends = {"v1": 100}),
])

# The receiving side: `web` enforces, `audited` only counts what it would deny.
authorization("web", rules = [allow(methods = ["GET", "HEAD"], paths = ["/public/*", "/"])])
authorization("audited", rules = [allow(paths = ["/ok"])], mode = "audit")
"""


@dataclass(frozen=True)
class Case:
    """One request: to `service`, sent through `listener` of the proxy running as `local`."""

    service: str
    path: str = "/"
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    listener: str = "outbound"
    local: str = "web"

    def cli_args(self) -> list[str]:
        args = ["--service", self.service, "--method", self.method, "--path", self.path]
        for name, value in self.headers.items():
            args += ["-H", f"{name}: {value}"]
        return args

    def admin_query(self) -> str:
        params = [("service", self.service), ("method", self.method), ("path", self.path)]
        params += [("header", f"{name}:{value}") for name, value in self.headers.items()]
        return "/explain?" + urlencode(params)


CASES = [
    # outbound: routing, the calling side's own answers
    Case("reviews", "/reviews/1", headers={"End-User": "jason"}),  # header match, rule 0
    Case("reviews", "/admin/1", headers={"end-user": "jason"}),  # rule 0 wins before the fault
    Case("reviews", "/admin/purge"),  # fault: 503 on every request
    Case("reviews", "/api/books"),  # path prefix and method
    Case("reviews", "/api/books?page=2"),  # the query string is not part of the path
    Case("reviews", "/api/books", method="POST"),  # rule 2 wants GET; nothing else matches: 404
    Case("reviews", "/other?debug"),  # query present()
    Case("reviews", "/"),  # path exact
    Case("reviews", "/other"),  # no rule matches: 404 no-route
    Case("details", "/details/1", method="DELETE"),  # no http_route: all endpoints
    # inbound: authorization on the receiving side (no caller identity in plaintext)
    Case("web", "/public/logo.png", listener="inbound"),
    Case("web", "/", method="HEAD", listener="inbound"),
    Case("web", "/private", listener="inbound"),  # 403 denied
    Case("web", "/public/x", method="POST", listener="inbound"),  # 403 denied
    Case("audited", "/nope", listener="inbound", local="audited"),  # audit: through, counted
    Case("audited", "/ok", listener="inbound", local="audited"),
]


def explain_cli(root: Path, case: Case) -> str:
    done = subprocess.run(
        [str(STARMESH), "explain", str(root), *case.cli_args(), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def expected_app(explained: dict[str, Any]) -> str:
    """The upstream the explained request must reach: its only version with a share."""
    reached = [version for version, share in explained["backends"].items() if share > 0]
    assert reached and len(reached) == 1 and explained["backends"][reached[0]] == 100, explained["backends"]
    return f"{explained['service']}-{reached[0]}"


def test_explain_the_admin_explain_and_the_running_proxy_agree(mesh: Any, proxies: Any, upstreams: Any, h: Any) -> None:
    apps = {name: upstreams.start(name) for name in ("reviews-v1", "reviews-v2", "reviews-v3", "details-v1")}
    locals_ = {name: upstreams.start(f"{name}-v1") for name in ("web", "audited")}
    bundle = mesh.bundle(POLICY)
    endpoints = mesh.endpoints(
        {
            "reviews": {v: [apps[f"reviews-{v}"]] for v in ("v1", "v2", "v3")},
            "details": {"v1": [apps["details-v1"]]},
        }
    )
    running = {"web": proxies.start(bundle=bundle, endpoints=endpoints, app=locals_["web"])}
    assert running["web"].status.startswith("ready "), running["web"].status
    running["audited"] = mesh.start_proxy("audited", "v1", locals_["audited"], bundle, endpoints)
    running["audited"].wait_ready()

    outcomes: dict[str, int] = {}
    for case in CASES:
        proxy = running[case.local]
        what = f"{case.method} {case.path} to {case.service} {case.headers}"

        # (a) and (b): the same document, byte for byte.
        printed = explain_cli(bundle.parent, case)
        admin = proxy.http("admin", case.admin_query())
        assert admin.status == 200, (what, admin.body)
        assert admin.body.decode() == printed, what
        explained = json.loads(printed)

        # (c): what the proxy does with the request.
        replies = h.many(getattr(proxy, case.listener), 3, case.path, host=case.service, method=case.method,
                         headers=case.headers)
        response = explained["response"]
        for reply in replies:
            if response is not None:
                assert (reply.status, reply.error) == (response["status"], response["reason"]), what
                assert reply.headers.get("x-upstream") is None, what
            elif case.listener == "outbound":
                assert (reply.status, reply.error, reply.headers.get("x-upstream")) == (
                    200, None, expected_app(explained)), what
            else:  # the receiving side forwards to its local app
                assert (reply.status, reply.error, reply.headers.get("x-upstream")) == (
                    200, None, f"{case.local}-v1"), what
        kind = "answered" if response is None else f"{response['status']} {response['reason']}"
        outcomes[kind] = outcomes.get(kind, 0) + 1

    # The cases cover every kind of answer.
    assert set(outcomes) == {"answered", "404 no-route", "503 fault", "403 denied"}, outcomes

    # Audit mode: the request explain calls a would-be denial went through and was counted.
    would_deny = json.loads(explain_cli(bundle.parent, CASES[-2]))["authorization"]
    assert (would_deny["allowed"], would_deny["would_deny"]) == (True, True)
    metrics = running["audited"].http("admin", "/metrics").body.decode()
    counted = [line for line in metrics.splitlines()
               if line.startswith("starmesh_authorization_audit_denials_total{") and 'destination_service="audited"' in line]
    assert len(counted) == 1 and float(counted[0].split()[-1]) == 3, counted
