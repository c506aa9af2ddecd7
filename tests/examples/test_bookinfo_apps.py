"""examples/bookinfo/apps: the four Bookinfo apps as real processes, and up.json.

    test ──http.client──► productpage ──► Router (a stand-in for the sidecar's outbound
                          reviews v2/v3 ──┘  listener: routes by Host to the app processes,
                                             records every call, injects failures)

No starmesh proxy takes part: the Router plays the sidecar, so a test can choose which
version answers, make a service fail the way the mesh would (`x-starmesh-error`), and
see which headers each app passed on. The apps run on 127.0.0.1 port 0 and are stopped
with SIGTERM; every test that starts a process checks it exited 0 and left nothing behind.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from starmesh.compiler.compile import compile_tree

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"
DEADLINE = 30.0
"""Seconds a process may take to start or stop (generous: the machine is shared)."""
INSTANCES = [
    ("productpage", "v1"),
    ("details", "v1"),
    ("details", "v2"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("ratings", "v1"),
]


# --------------------------------------------------------------------------- app processes


class App:
    """One app process, in a process group of its own; stdout is read line by line."""

    def __init__(self, service: str, version: str, outbound: str | None, tmp: Path, *extra: str) -> None:
        argv = [sys.executable, str(EXAMPLE / "apps" / f"{service}.py"), "--service", service, "--version", version]
        argv += ["--listen", "127.0.0.1:0", *(["--outbound", outbound] if outbound else []), *extra]
        self.name = f"{service}-{version}"
        self.stderr_path = tmp / f"{self.name}-{os.urandom(4).hex()}.err"
        with self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True, start_new_session=True
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def started(self) -> App:
        """Wait for the one `listening HOST:PORT` line."""
        try:
            line = self.lines.get(timeout=DEADLINE)
        except queue.Empty:
            pytest.fail(f"{self.name} printed nothing within {DEADLINE}s: {self.stderr_path.read_text()}")
        assert line is not None, f"{self.name} exited {self.popen.wait()}: {self.stderr_path.read_text()}"
        self.stdout.append(line)
        assert line.startswith("listening 127.0.0.1:"), line
        self.address = line.removeprefix("listening ")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait for the exit code; kill the whole group if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._reader.join(DEADLINE)
            while not self.lines.empty():
                line = self.lines.get_nowait()
                if line is not None:
                    self.stdout.append(line)
            if self.popen.stdout is not None:
                self.popen.stdout.close()

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(DEADLINE)

    def gone(self) -> bool:
        """Reaped, and nothing left in its process group."""
        if self.popen.poll() is None:
            return False
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return True
        return False


def stop_all(apps: list[App]) -> None:
    """SIGTERM every app; each must exit 0, print nothing more, and be gone."""
    codes: dict[str, int | None] = {}
    for app in apps:
        try:
            codes[app.name] = app.stop()
        except subprocess.TimeoutExpired:
            codes[app.name] = None
    assert codes == {app.name: 0 for app in apps}, {app.name: app.stderr_path.read_text() for app in apps}
    assert all(app.gone() for app in apps)
    assert all(len(app.stdout) == 1 for app in apps), {app.name: app.stdout for app in apps}


# --------------------------------------------------------------------------- the fake sidecar


@dataclass
class Call:
    """One request an app sent to its sidecar."""

    service: str
    path: str
    headers: dict[str, str]


@dataclass
class Router:
    """Plays the sidecar's outbound listener in a thread of its own: Host → app process.

    `routes` maps a service to the address of the instance that answers it; `faults`
    answers a service's calls the way the proxy would (status + `x-starmesh-error`);
    `delays` holds a service's calls that long before forwarding; a call to one of the
    `together` services waits (up to 2 s) until a call to each of them has arrived, and
    fails with 503 `not-concurrent` if that never happens. `calls` records all.
    """

    routes: dict[str, str] = field(default_factory=dict)
    faults: dict[str, tuple[int, str]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    together: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    address: str = ""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._arrived: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(DEADLINE)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(DEADLINE)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE)
        self._loop.close()

    def reset(self, **routes: str) -> None:
        with self._lock:
            self.routes, self.faults, self.delays, self.together, self.calls[:] = dict(routes), {}, {}, set(), []
            self._arrived = set()

    def calls_to(self, service: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.service == service]

    async def _start(self) -> str:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        return f"{host}:{port}"

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _meet(self, service: str, together: set[str]) -> bool:
        """Wait until a call to each of the `together` services has arrived (on the router's loop)."""
        self._arrived.add(service)
        for _ in range(200):
            if self._arrived >= together:
                return True
            await asyncio.sleep(0.01)
        return False

    async def _forward(self, request: web.Request) -> web.Response:
        service = request.host.partition(":")[0]
        with self._lock:
            self.calls.append(Call(service, request.path_qs, {k.lower(): v for k, v in request.headers.items()}))
            fault, delay, target = self.faults.get(service), self.delays.get(service), self.routes.get(service)
            together = set(self.together)
        if delay:
            await asyncio.sleep(delay)
        if service in together and not await self._meet(service, together):
            return web.Response(status=503, text="not-concurrent\n", headers={"x-starmesh-error": "not-concurrent"})
        if fault:
            return web.Response(status=fault[0], text=f"{fault[1]}\n", headers={"x-starmesh-error": fault[1]})
        if target is None:
            return web.Response(status=404, text="no-route\n", headers={"x-starmesh-error": "no-route"})
        passed = {k: v for k, v in request.headers.items() if k.lower() in ("end-user", "x-request-id", "accept")}
        async with self._session.get(f"http://{target}{request.path_qs}", headers=passed) as answer:
            keep = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "x-app-name")}
            return web.Response(status=answer.status, body=await answer.read(), headers=keep)


# --------------------------------------------------------------------------- fixtures and a client


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def get(address: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    """One GET, redirects not followed."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    fake = Router()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def apps(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, App]]:
    """All seven instances of up.json, calling through the Router; stopped (exit 0) at the end."""
    tmp = tmp_path_factory.mktemp("bookinfo")
    started: list[App] = []
    try:
        for service, version in INSTANCES:
            started.append(App(service, version, router.address, tmp))
        yield {app.name: app.started() for app in started}
        stop_all(started)
    finally:
        for app in started:
            if app.popen.poll() is None:
                app.kill()


@pytest.fixture
def mesh(router: Router, apps: dict[str, App]) -> Router:
    """The Router with every service on v1 and nothing recorded yet."""
    router.reset(**{s: apps[f"{s}-v1"].address for s in ("details", "reviews", "ratings")})
    return router


# --------------------------------------------------------------------------- up.json


def test_the_manifest_has_an_app_for_every_version_the_policy_declares() -> None:
    manifest = json.loads((EXAMPLE / "up.json").read_text(encoding="utf-8"))
    assert manifest["mesh"] == "bookinfo"
    assert manifest["entry"] == {"service": "productpage", "path": "/productpage"}
    assert [(a["service"], a["version"]) for a in manifest["apps"]] == INSTANCES
    assert all(a["script"] == f"apps/{a['service']}.py" and (EXAMPLE / a["script"]).is_file() for a in manifest["apps"])

    compiled = compile_tree(EXAMPLE / manifest["policies"])
    assert compiled.bundle is not None
    spec = compiled.bundle.spec
    assert spec.mesh.name == manifest["mesh"]
    declared = {(name, v) for name, s in spec.services.items() for v in (s.versions or ("v1",))}
    assert declared == set(INSTANCES)

    assert manifest["try"] and all(isinstance(t, str) and "{entry}" in t for t in manifest["try"])
    assert not any("{" in t.replace("{entry}", "") or "}" in t.replace("{entry}", "") for t in manifest["try"])


# --------------------------------------------------------------------------- the leaves


def test_ratings_answers_the_stars_of_any_book(apps: dict[str, App]) -> None:
    answer = get(apps["ratings-v1"].address, "/ratings/7")
    assert answer.status == 200 and answer.headers["x-app-name"] == "ratings-v1"
    assert answer.json() == {"id": 7, "ratings": {"Reviewer1": 5, "Reviewer2": 4}, "version": "v1"}

    missing = get(apps["ratings-v1"].address, "/ratings/seven")
    assert missing.status == 404 and missing.headers["x-app-name"] == "ratings-v1"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_details_answers_the_facts_and_its_version(apps: dict[str, App], version: str) -> None:
    answer = get(apps[f"details-{version}"].address, "/details/0")
    assert answer.status == 200 and answer.headers["x-app-name"] == f"details-{version}"
    details = answer.json()
    assert isinstance(details, dict)
    assert set(details) == {
        "id", "version", "author", "year", "type", "pages", "publisher", "language", "ISBN-10", "ISBN-13",
    }  # fmt: skip
    assert (details["id"], details["version"], details["author"]) == (0, version, "William Shakespeare")


# --------------------------------------------------------------------------- reviews


def test_reviews_v1_shows_no_stars_and_never_calls_ratings(apps: dict[str, App], mesh: Router) -> None:
    answer = get(apps["reviews-v1"].address, "/reviews/0", {"end-user": "alice"})
    assert answer.status == 200 and answer.headers["x-app-name"] == "reviews-v1"
    reviews = answer.json()
    assert isinstance(reviews, dict)
    assert (reviews["id"], reviews["version"], reviews["ratings_error"]) == (0, "v1", None)
    assert [r["reviewer"] for r in reviews["reviews"]] == ["Reviewer1", "Reviewer2"]
    assert all(set(r) == {"reviewer", "text"} for r in reviews["reviews"])
    assert mesh.calls == []


@pytest.mark.parametrize(("version", "color"), [("v2", "black"), ("v3", "red")])
def test_reviews_v2_and_v3_show_the_stars_from_ratings_in_their_color(
    apps: dict[str, App], mesh: Router, version: str, color: str
) -> None:
    answer = get(apps[f"reviews-{version}"].address, "/reviews/3", {"end-user": "jason", "x-request-id": "r-1"})
    assert answer.status == 200 and answer.headers["x-app-name"] == f"reviews-{version}"
    reviews = answer.json()
    assert isinstance(reviews, dict)
    assert [r["rating"] for r in reviews["reviews"]] == [{"stars": 5, "color": color}, {"stars": 4, "color": color}]
    assert (reviews["ratings_error"], reviews["ratings_version"]) == (None, "v1")

    [call] = mesh.calls_to("ratings")
    assert call.path == "/ratings/3"
    assert (call.headers["end-user"], call.headers["x-request-id"]) == ("jason", "r-1")


def test_reviews_degrade_gracefully_when_ratings_fails(apps: dict[str, App], mesh: Router) -> None:
    mesh.faults["ratings"] = (503, "fault")  # what the mesh does to chaos-tester's calls
    answer = get(apps["reviews-v2"].address, "/reviews/0", {"end-user": "chaos-tester"})
    assert answer.status == 200
    reviews = answer.json()
    assert isinstance(reviews, dict)
    assert (reviews["ratings_error"], reviews["ratings_version"]) == ("503 fault", None)
    assert [set(r) for r in reviews["reviews"]] == [{"reviewer", "text"}] * 2
    assert len(mesh.calls_to("ratings")) == 1


# --------------------------------------------------------------------------- productpage


def test_productpage_puts_details_and_reviews_together(apps: dict[str, App], mesh: Router) -> None:
    mesh.routes["reviews"] = apps["reviews-v2"].address
    answer = get(apps["productpage-v1"].address, "/api/v1/products/0")
    assert answer.status == 200 and answer.headers["x-app-name"] == "productpage-v1"
    product = answer.json()
    assert isinstance(product, dict)
    assert (product["id"], product["title"]) == (0, "The Comedy of Errors")
    assert product["details"]["version"] == "v1" and product["details"]["ISBN-10"] == "1234567890"
    assert [r["rating"]["color"] for r in product["reviews"]["reviews"]] == ["black", "black"]
    assert product["served_by"] == {"productpage": "v1", "details": "v1", "reviews": "v2", "ratings": "v1"}
    assert product["errors"] == {"details": None, "reviews": None}
    assert [c.path for c in mesh.calls_to("details")] == ["/details/0"]
    assert [c.path for c in mesh.calls_to("reviews")] == ["/reviews/0"]

    page = get(apps["productpage-v1"].address, "/productpage")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "reviews v2 · details v1 · ratings v1" in page.text
    assert "William Shakespeare" in page.text and "slapstick" in page.text
    assert "color: black" in page.text and "★★★★★" in page.text and "★★★★☆" in page.text

    mesh.routes["reviews"] = apps["reviews-v1"].address
    page = get(apps["productpage-v1"].address, "/productpage")
    assert "reviews v1 · details v1 · ratings —" in page.text and "★" not in page.text


def test_productpage_calls_details_and_reviews_at_the_same_time(apps: dict[str, App], mesh: Router) -> None:
    mesh.together.update(("details", "reviews"))  # each call is held until the other one arrives
    product = get(apps["productpage-v1"].address, "/api/v1/products/0").json()
    assert isinstance(product, dict)
    assert product["errors"] == {"details": None, "reviews": None}


def test_productpage_lists_its_products(apps: dict[str, App]) -> None:
    answer = get(apps["productpage-v1"].address, "/api/v1/products")
    assert answer.status == 200
    products = answer.json()
    assert isinstance(products, list)
    assert [(p["id"], p["title"]) for p in products] == [(0, "The Comedy of Errors")]
    assert get(apps["productpage-v1"].address, "/api/v1/products/9").status == 404


def test_productpage_shows_failures_of_the_services_it_calls(apps: dict[str, App], mesh: Router) -> None:
    mesh.faults.update(details=(403, "denied"), reviews=(503, "no-healthy-upstream"))
    answer = get(apps["productpage-v1"].address, "/api/v1/products/0")
    assert answer.status == 200
    product = answer.json()
    assert isinstance(product, dict)
    assert (product["details"], product["reviews"]) == (None, None)
    assert product["errors"] == {"details": "403 denied", "reviews": "503 no-healthy-upstream"}
    assert product["served_by"] == {"productpage": "v1", "details": None, "reviews": None, "ratings": None}

    page = get(apps["productpage-v1"].address, "/productpage")
    assert page.status == 200
    assert "403 denied" in page.text and "503 no-healthy-upstream" in page.text
    assert "reviews — · details — · ratings —" in page.text


def test_productpage_reports_a_slow_service_as_a_timeout(apps: dict[str, App], mesh: Router) -> None:
    mesh.delays["details"] = 4.0  # longer than productpage waits (3 s)
    product = get(apps["productpage-v1"].address, "/api/v1/products/0").json()
    assert isinstance(product, dict)
    assert product["errors"] == {"details": "timeout after 3s", "reviews": None}
    assert product["reviews"]["version"] == "v1"


def test_productpage_without_a_sidecar_still_answers(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"
    app = App("productpage", "v1", closed, tmp_path).started()
    try:
        product = get(app.address, "/api/v1/products/0").json()
        assert isinstance(product, dict)
        errors = product["errors"]
        assert errors["details"].startswith(f"cannot reach the sidecar at {closed}"), errors
        assert errors["reviews"].startswith(f"cannot reach the sidecar at {closed}"), errors
        assert "cannot reach the sidecar" in get(app.address, "/productpage").text
    finally:
        stop_all([app])


def test_productpage_passes_on_end_user_and_request_id(apps: dict[str, App], mesh: Router) -> None:
    mesh.routes["reviews"] = apps["reviews-v3"].address
    get(apps["productpage-v1"].address, "/api/v1/products/0", {"end-user": "jason", "x-request-id": "req-42"})
    calls = mesh.calls_to("details") + mesh.calls_to("reviews") + mesh.calls_to("ratings")
    assert [c.service for c in calls] == ["details", "reviews", "ratings"]
    assert all((c.headers.get("end-user"), c.headers.get("x-request-id")) == ("jason", "req-42") for c in calls)


def test_login_sets_the_user_the_mesh_routes_by(apps: dict[str, App], mesh: Router) -> None:
    address = apps["productpage-v1"].address
    home = get(address, "/")
    assert (home.status, home.headers["location"]) == (302, "/productpage")
    assert home.headers["x-app-name"] == "productpage-v1"

    login = get(address, "/login?user=jason")
    assert (login.status, login.headers["location"]) == (302, "/productpage")
    assert login.headers["set-cookie"].startswith("user=jason;")
    assert get(address, "/login?user=no%20spaces").status == 400

    page = get(address, "/productpage", {"cookie": "user=jason"})
    assert "Signed in as <b>jason</b>" in page.text
    assert [c.headers.get("end-user") for c in mesh.calls] == ["jason", "jason"]

    mesh.reset(**mesh.routes)
    get(address, "/api/v1/products/0", {"cookie": "user=jason", "end-user": "alice"})
    assert [c.headers.get("end-user") for c in mesh.calls] == ["alice", "alice"], "the header wins over the cookie"

    mesh.reset(**mesh.routes)
    get(address, "/api/v1/products/0")
    assert [c.headers.get("end-user") for c in mesh.calls] == [None, None]

    logout = get(address, "/logout")
    assert logout.status == 302 and logout.headers["set-cookie"].startswith('user="";')


# --------------------------------------------------------------------------- start-up and stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_app_with_exit_0(router: Router, tmp_path: Path, sig: int) -> None:
    page = App("productpage", "v1", router.address, tmp_path).started()
    ratings = App("ratings", "v1", None, tmp_path).started()
    try:
        # An idle keep-alive connection must not hold the app up.
        host, port = page.address.split(":")
        idle = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
        idle.request("GET", "/api/v1/products")
        assert idle.getresponse().read()
        assert page.stop(sig) == 0 and ratings.stop(sig) == 0
        idle.close()
        assert page.gone() and ratings.gone()
        assert page.stdout == [f"listening {page.address}"] and ratings.stdout == [f"listening {ratings.address}"]
    finally:
        for app in (page, ratings):
            if not app.gone():
                app.kill()


@pytest.mark.parametrize(
    ("service", "args", "message"),
    [
        ("reviews", ["--service", "details", "--version", "v1"], "this script is the 'reviews' app, not 'details'"),
        ("reviews", ["--version", "v2"], "reviews v2 calls other services through its sidecar: give --outbound"),
        ("ratings", ["--version", "v9"], "invalid choice: 'v9'"),
        ("details", ["--version", "v1", "--listen", "nowhere"], "'nowhere' is not HOST:PORT"),
    ],
)
def test_a_wrong_command_line_exits_2_and_says_why(service: str, args: list[str], message: str) -> None:
    argv = [sys.executable, str(EXAMPLE / "apps" / f"{service}.py"), *args]
    if "--listen" not in args:
        argv += ["--listen", "127.0.0.1:0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
    assert (done.returncode, done.stdout) == (2, "")
    assert message in done.stderr
