"""`promtool check metrics` (Prometheus's own linter) on a real proxy's /metrics after traffic.

promtool comes with Debian's `prometheus` package, which .ci/run installs; without it on
PATH the test is skipped and says why.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"], rate_limit = rate_limit(0.01, burst = 1))
service(name = "api", versions = ["v1", "v2"])
http_route("api", rules = [
    rule(match = [match(path_prefix = "/fault")], backends = {"v1": 100},
         fault = fault(abort_status = 503, abort_percent = 100)),
    rule(match = [match(path_prefix = "/status/")], backends = {"v1": 100},
         retries = retries(attempts = 1, per_try_timeout = "5s"), timeout = "10s"),
    rule(backends = {"v1": 100}, mirror = mirror("v2")),
])
"""


def test_promtool_finds_no_problem_in_a_proxys_metrics(mesh: Any, proxies: Any) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian's prometheus package; .ci/run installs it)")
    v1, v2, local = mesh.apps("v1", "v2", "local")
    endpoints = mesh.endpoints({"api": {"v1": [v1.address], "v2": [v2.address]}})
    proxy = proxies.start(bundle=mesh.bundle(POLICY), endpoints=endpoints, app=local.address)
    for path in ("/", "/fault", "/status/503", "/status/404"):
        proxy.http("outbound", path, {"Host": "api"})
    assert [proxy.http("inbound", "/").status for _ in range(2)] == [200, 429]
    text = proxy.http("admin", "/metrics").body
    assert b"starmesh_requests_total{" in text and b"starmesh_retries_total{" in text

    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    assert not (checked.stdout + checked.stderr).strip(), (checked.stdout + checked.stderr).decode()
