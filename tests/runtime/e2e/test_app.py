"""The e2e test app and fixtures themselves: behaviours, counters, process clean-up.

The other e2e tests trust these counts, so they are checked here against the app
directly (no proxy involved).
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.slow


def test_app_behaviours_and_counters(mesh: Any, h: Any) -> None:
    app = mesh.app("v7")

    plain = h.call(app.address, "/anything")
    assert (plain.status, plain.app, plain.json()) == (200, "v7", {"name": "v7", "method": "GET", "path": "/anything"})

    assert h.call(app.address, "/status/503").status == 503
    assert h.call(app.address, "/x", headers={"x-app-status": "418"}).status == 418
    assert h.call(app.address, "/delay/1").status == 200

    echo = h.call(app.address, "/echo?q=1", method="POST", headers={"x-test": "yes"}, body=b"hi").json()
    assert (echo["method"], echo["path"], echo["query"], echo["body"]) == ("POST", "/echo", "q=1", "hi")
    assert ["x-test", "yes"] in [[k.lower(), v] for k, v in echo["headers"]]

    raw, closed = h.raw_exchange(app.address, b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (raw, closed) == (b"", True)

    assert app.stats() == {
        "GET /anything": 1,
        "GET /status/503": 1,
        "GET /x": 1,
        "GET /delay/1": 1,
        "POST /echo": 1,
        "GET /reset": 1,
    }
    assert app.total() == 6
    app.reset_stats()
    assert app.stats() == {} and app.total() == 0

    app.force_status(500)
    assert h.call(app.address, "/y").status == 500
    app.force_status(None)
    assert h.call(app.address, "/y").status == 200
    assert app.hosts() == {app.address: 2}


def test_processes_are_stopped_and_gone(mesh: Any) -> None:
    first, second = mesh.apps("a", "b")
    mesh.close()
    assert first.process.gone() and second.process.gone()
    assert first.process.popen.returncode == 0  # SIGTERM handled: a clean exit
    mesh.processes.clear()


def test_bundles_compile_and_bad_policy_is_reported(mesh: Any) -> None:
    bundle = mesh.bundle('mesh(name = "e2e", mtls = "disable")\nservice(name = "a")\n')
    assert bundle.read_bytes().startswith(b'{"apiVersion":"starmesh/v1"')
    with pytest.raises(AssertionError, match="does not compile"):
        mesh.bundle('mesh(name = "e2e")\nservice(name = "a", versions = 3)\n')
