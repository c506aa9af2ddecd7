"""Access logs (runtime/access_log.py): the cap, the bounded queue, the writer, rotation,
and the lines the telemetry filter hands it from real chains."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from starmesh.bundle.canonical import decode_bundle, digest_of
from starmesh.bundle.routes import PreparedService, prepare_service
from starmesh.bundle.spec import AccessLog as AccessLogSpec
from starmesh.bundle.spec import Allow, Authorization, MeshConfig, Service, Spec
from starmesh.runtime.access_log import AccessEntry, AccessLog, open_access_log, render
from starmesh.runtime.chain import ChainDeps, build_inbound, build_outbound
from starmesh.runtime.endpoints import Endpoints
from starmesh.runtime.message import FixedBody, Headers, Request, Response
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.table import RouteTable
from starmesh.runtime.telemetry import MemoryRecorder
from starmesh.runtime.tracing import Tracer

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def entry(**changes: Any) -> AccessEntry:
    base = AccessEntry(
        1_700_000_000.5, "outbound", "GET", "/x", "HTTP/1.1", 200, "", "api", "127.0.0.1:7001", "v1",
        "route/api/0 mesh.star:3", 0.0012345, 0, 5, TRACE, "web", "req-1", "api", "curl/8",
    )
    return base._replace(**changes)


# -- the cap and the queue ---------------------------------------------------------------------------


def test_the_token_bucket_admits_the_rate_and_counts_the_rest() -> None:
    log = AccessLog("-")
    admitted = [log.admit(100.0, 5) for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3  # starts full: one second's worth
    assert log.dropped == 3
    assert log.admit(100.1, 5) is False  # half a token
    assert log.admit(100.3, 5) is True  # refilled at 5 per second
    assert sum(log.admit(200.0, 5) for _ in range(10)) == 5  # never more than one second's worth
    assert log.dropped == 3 + 1 + 5


def test_a_new_rate_starts_a_full_bucket_and_zero_admits_nothing() -> None:
    log = AccessLog("-")
    assert sum(log.admit(1.0, 2) for _ in range(5)) == 2
    assert sum(log.admit(1.0, 10) for _ in range(20)) == 10
    assert sum(log.admit(2.0, 0) for _ in range(5)) == 0
    assert log.dropped == 3 + 10 + 5


def test_a_full_queue_drops_and_counts() -> None:
    log = AccessLog("-", max_queue=3)  # no writer started: nothing drains
    for _ in range(5):
        log.put(entry())
    assert log.dropped == 2


# -- the writer ------------------------------------------------------------------------------------------


def test_lines_are_json_with_the_envoy_fields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    log.start()
    log.put(entry())
    log.put(entry(direction="inbound", status=403, reason="denied", upstream="", would_deny=True, path="/p" * 1000))
    log.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first == {
        "time": "2023-11-14T22:13:20.500Z",
        "direction": "outbound",
        "method": "GET",
        "path": "/x",
        "protocol": "HTTP/1.1",
        "status": 200,
        "reason": "",
        "service": "api",
        "upstream": "127.0.0.1:7001",
        "upstream_version": "v1",
        "route": "route/api/0 mesh.star:3",
        "duration_ms": 1.234,
        "bytes_received": 0,
        "bytes_sent": 5,
        "trace_id": TRACE,
        "source": "web",
        "request_id": "req-1",
        "authority": "api",
        "user_agent": "curl/8",
    }
    assert second["upstream"] is None and second["would_deny"] is True and second["reason"] == "denied"
    assert len(second["path"]) == 1024  # cut
    assert log.written == 2 and log.dropped == 0


def test_the_file_is_rotated_keeping_one_old_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    size = len(render(entry()))
    log = AccessLog(path, rotate_bytes=size * 10)
    log.start()
    for round_ in range(3):  # 30 lines over three drains: rotated at 10, 20, 30
        for _ in range(10):
            log.put(entry(status=200 + round_))
        log.close()
        log.start()
    log.close()
    old = tmp_path / "access.log.1"
    assert old.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["access.log", "access.log.1"]
    statuses = [json.loads(line)["status"] for line in old.read_text().splitlines()]
    assert statuses == [202] * 10  # the newest full file; older ones are gone
    assert path.read_text() == ""  # rotated right after the 30th line
    assert log.written == 30


def test_a_write_error_counts_the_lines_as_dropped(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "missing-dir" / "access.log")
    log.start()
    log.put(entry())
    log.put(entry())
    log.close()
    assert log.written == 0 and log.dropped == 2


def test_off_means_no_log_and_the_default_is_in_the_state_dir(tmp_path: Path) -> None:
    assert open_access_log("off", tmp_path) is None
    log = open_access_log(None, tmp_path)
    assert log is not None
    log.put(entry())
    log.close()
    assert json.loads((tmp_path / "access.log").read_text())["path"] == "/x"


def test_the_cli_refuses_an_access_log_in_a_missing_directory(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_text("{}")
    args = ["--service", "web", "--version", "v1", "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:0",
            "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
            "--bundle", str(bundle), "--access-log", str(tmp_path / "nope" / "access.log")]
    done = subprocess.run([sys.executable, "-m", "starmesh.cli", "proxy", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--access-log" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "state").exists()  # nothing changed


# -- lines from the chains -------------------------------------------------------------------------------


class Pool:
    async def send(self, endpoint: str, request: Request, *, host: str | None = None) -> Response:
        return Response(200, [], FixedBody(b"hello"), endpoint=endpoint)

    def active(self, endpoint: str) -> int:
        return 0

    def retain(self, endpoints: frozenset[str]) -> None:
        pass


def prepared(authorization: Authorization | None = None) -> PreparedService:
    service = Service(versions=("v1",))
    spec = Spec(mesh=MeshConfig(name="m"), services={"api": service},
                authorization={"api": authorization} if authorization is not None else {})
    return prepare_service("api", service, None, authorization, spec)


def deps(log: AccessLog, mesh: MeshConfig, tracer: Tracer | None = None) -> ChainDeps:
    """The chain's clock stands still: the bucket refills only between tests."""
    return ChainDeps(
        clock=lambda: 100.0,
        pool=Pool(),
        endpoints=Endpoints({"api": {"v1": ("127.0.0.1:7001",)}}),
        state=StateRegistry(),
        recorder=MemoryRecorder(),
        local_service="web",
        local_version="v1",
        access_log=log,
        tracer=tracer,
        mesh=mesh,
    )


def send(handler: Any, headers: Headers, *, source: str | None = None, n: int = 1) -> None:
    async def main() -> None:
        for _ in range(n):
            request = Request("POST", "/items", "a=1", list(headers), FixedBody(b"abc"), "api", "api", "127.0.0.9", source)
            await handler(request)

    asyncio.run(main())


def test_the_chains_log_under_the_meshs_cap(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log")
    log.start()
    mesh = MeshConfig(name="m", access_log=AccessLogSpec(enabled=True, max_lines_per_second=3))
    service = prepared()
    handler = build_outbound(service, service.rules[0], deps(log, mesh, Tracer("web")))
    headers = [("host", "api"), ("x-request-id", "r-7"), ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-00")]
    send(handler, headers, n=10)  # within one (still) second: 3 fit, the rest are dropped
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert len(lines) == 3 and log.dropped == 7
    line = lines[0]
    assert (line["direction"], line["method"], line["path"], line["status"]) == ("outbound", "POST", "/items", 200)
    assert (line["upstream"], line["source"], line["request_id"], line["trace_id"]) == ("127.0.0.1:7001", "web", "r-7", TRACE)
    assert (line["bytes_received"], line["bytes_sent"], line["route"]) == (3, 5, "service/api")


def test_a_disabled_access_log_writes_and_drops_nothing(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log")
    log.start()
    mesh = MeshConfig(name="m", access_log=AccessLogSpec(enabled=False))
    service = prepared()
    send(build_outbound(service, service.rules[0], deps(log, mesh)), [("host", "api")], n=5)
    log.close()
    assert log.written == 0 and log.dropped == 0


def test_an_audit_denial_is_logged_as_would_deny(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.log")
    log.start()
    authorization = Authorization(rules=(Allow(sources=("web",)),), mode="audit")
    handler = build_inbound(prepared(authorization), deps(log, MeshConfig(name="m")), "127.0.0.1:9080")
    send(handler, [("host", "api")], source="web")
    send(handler, [("host", "api")], source="intruder")
    log.close()
    admitted, denied = (json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines())
    assert admitted["source"] == "web" and "would_deny" not in admitted
    assert denied["source"] == "intruder" and denied["would_deny"] is True and denied["status"] == 200
    assert denied["direction"] == "inbound" and denied["upstream_version"] == "v1"
    assert denied["trace_id"] is None  # no tracer, no traceparent


UNROUTED_POLICY = """
mesh(name = "t", mtls = "disable")
service(name = "web", versions = ["v1"])
service(name = "docs", versions = ["v1"])
http_route("docs", rules = [rule(match = [match(path_prefix = "/docs")])])
"""


def test_requests_no_rule_takes_are_counted_and_logged_under_a_bounded_destination(tmp_path: Path, rt: Any) -> None:
    log = AccessLog(tmp_path / "access.log")
    log.start()
    chain_deps = deps(log, MeshConfig(name="m"))
    data = rt.compile_policy(tmp_path / "policy", UNROUTED_POLICY)
    table = RouteTable.build(decode_bundle(data), digest_of(data), chain_deps, app="127.0.0.1:9")

    async def main() -> list[Response]:
        return [
            await table.outbound(Request("GET", path, None, [("host", host)], FixedBody(b""), host, host))
            for host, path in (("made-up-1", "/"), ("made-up-2", "/"), ("docs", "/elsewhere"), ("docs", "/docs/a"))
        ]

    answers = asyncio.run(main())
    log.close()
    assert [(a.status, a.error) for a in answers] == [(404, "no-route")] * 3 + [(503, "no-healthy-upstream")]
    recorder = chain_deps.recorder
    assert isinstance(recorder, MemoryRecorder)
    # Names the bundle does not declare count as "unknown": a made-up Host cannot add series.
    counted = {key[2]: sum(buckets) for key, _, buckets in recorder.series() if key[5] == "no-route"}
    assert counted == {"unknown": 2, "docs": 1}
    assert recorder.requests_total(direction="outbound", source_service="web", response_code=404) == 3
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [(line["service"], line["authority"], line["status"], line["reason"]) for line in lines] == [
        ("unknown", "made-up-1", 404, "no-route"),
        ("unknown", "made-up-2", 404, "no-route"),
        ("docs", "docs", 404, "no-route"),
        ("docs", "docs", 503, "no-healthy-upstream"),
    ]
    assert lines[0]["route"] is None and lines[0]["upstream"] is None
