"""`starmesh up` end to end: a real `up` subprocess brings up a whole mesh, follows a
commit to its policy repo, refuses a second `up` on its state dir, and leaves no process
behind after Ctrl-C (issue 8).

    test ──► python -m starmesh.cli up EXAMPLE --state-dir TMP   (stdout: plain lines)
               ├─ control plane, one sidecar + one app per up.json instance
               └─ the test reads `productpage URL`, `control plane URL`, `policy repo PATH`,
                  calls the entry, commits to the repo, sends SIGINT, scans /proc

Two examples: the real examples/bookinfo (the issue's "done when"), and `tiny`, a
one-instance example written into tmp_path by the tests (an aiohttp app following the
up.json contract), for the cheaper checks. Git runs with an empty global config, so
`up` must set the created repo's local identity itself.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
START_DEADLINE = 90.0
STOP_DEADLINE = 60.0

TINY_APP = """\
import argparse, asyncio, signal
from aiohttp import web

parser = argparse.ArgumentParser()
for flag in ("--service", "--version", "--listen", "--outbound"):
    parser.add_argument(flag, required=True)
args = parser.parse_args()
host, _, port = args.listen.rpartition(":")

async def hello(request):
    return web.json_response({"service": args.service, "version": args.version})

async def serve():
    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port)).start()
    print(f"listening {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()

asyncio.run(serve())
"""

TINY_POLICY = 'mesh(name = "tiny", trust_domain = "tiny.local", mtls = "disable")\nservice(name = "web", versions = ["v1"])\n'


def tiny_example(where: Path, policy: str = TINY_POLICY) -> Path:
    """A one-instance example: service web v1, entry /hello."""
    (where / "policies").mkdir(parents=True)
    (where / "policies" / "mesh.star").write_text(policy)
    (where / "app.py").write_text(TINY_APP)
    up_json = {
        "mesh": "tiny",
        "policies": "policies",
        "entry": {"service": "web", "path": "/hello"},
        "apps": [{"service": "web", "version": "v1", "script": "app.py"}],
        "try": ["curl -s http://{entry}/hello"],
    }
    (where / "up.json").write_text(json.dumps(up_json))
    return where


def git_env(tmp_path: Path) -> dict[str, str]:
    """The environment with no global or system Git config (so no identity)."""
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    return dict(os.environ, GIT_CONFIG_GLOBAL=str(empty), GIT_CONFIG_NOSYSTEM="1", PYTHONUNBUFFERED="1")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=starmesh tests", "-c", "user.email=tests@example.invalid", *args],
        cwd=repo, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def leftovers(state: Path) -> list[str]:
    """Every process whose command line mentions `state` (none once `up` has exited)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def children_of(parent: int) -> dict[int, str]:
    """pid -> command line of every process whose parent is `parent`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return found


def still_running(processes: dict[int, str]) -> list[str]:
    """Those of `processes` that still exist (same pid, same command line)."""
    alive = []
    for pid, cmdline in processes.items():
        try:
            now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if now == cmdline:
            alive.append(f"{pid}: {cmdline}")
    return alive


class Up:
    """A `starmesh up` subprocess whose merged output a thread collects line by line."""

    def __init__(self, args: list[str], env: dict[str, str], state: Path) -> None:
        self.state = state
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "starmesh.cli", "up", *args, "--state-dir", str(state)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_line(self, pick: Callable[[str], bool], what: str, deadline: float = START_DEADLINE) -> str:
        end = time.monotonic() + deadline
        with self._changed:
            while True:
                found = next((line for line in self.lines if pick(line)), None)
                if found is not None:
                    return found
                if self.popen.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"up exited with {self.popen.returncode} before {what}:\n{self.output_locked()}")
                if time.monotonic() > end:
                    pytest.fail(f"up: no {what} within {deadline}s:\n{self.output_locked()}")
                self._changed.wait(0.2)

    def output_locked(self) -> str:
        return "\n".join(self.lines)

    def value(self, prefix: str) -> str:
        """The rest of the one line that starts with `prefix`."""
        matching = [line for line in self.lines if line.startswith(prefix)]
        assert len(matching) == 1, f"want one line starting {prefix!r}:\n{self.output()}"
        return matching[0].removeprefix(prefix).strip()

    def interrupt(self) -> int:
        """SIGINT (Ctrl-C) and the exit code, once `up` has exited."""
        self.popen.send_signal(signal.SIGINT)
        code = self.popen.wait(STOP_DEADLINE)
        self._reader.join(10)
        return code

    def close(self) -> None:
        """Stop `up` if a test left it running (SIGTERM, then SIGKILL: its children follow)."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._reader.join(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """Starts `up` processes; stops them and kills anything of theirs left (after asserting none is)."""
    started: list[Up] = []
    env = git_env(tmp_path)

    def start(example: str | Path, state: Path) -> Up:
        up = Up([str(example)], env, state)
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            up.close()
        stray = [line for up in started for line in leftovers(up.state)]
        for line in stray:  # a safety net: the test has failed already if there are any
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not stray, "processes left behind:\n" + "\n".join(stray)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def reviews_version(entry: str) -> object:
    status, body = get(f"{entry}/api/v1/products/0")
    assert status == 200, body
    served_by = json.loads(body)["served_by"]
    assert served_by["productpage"] == "v1"
    return served_by["reviews"]


def test_up_runs_bookinfo_follows_a_commit_and_leaves_nothing_after_ctrl_c(tmp_path: Path, start_up: Callable[..., Up]) -> None:
    state = tmp_path / "state"
    up = start_up("examples/bookinfo", state)
    up.wait_line(lambda line: line == "running (Ctrl-C to stop)", "`running` line")
    page = up.value("productpage ")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/productpage", page), page
    entry = page.removesuffix("/productpage")
    control_plane = up.value("control plane ")
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", control_plane)
    ca_cert = state / "ca" / "ca.crt"
    assert up.value("mesh CA ") == f"{ca_cert} (trust domain bookinfo.local)"  # mesh(trust_domain = ...)
    assert up.value("status ") == f"starmesh status --control-plane {control_plane} --ca-cert {ca_cert}"
    repo = Path(up.value("policy repo "))
    assert repo == state / "repo"
    assert git(repo, "log", "--format=%s") == "Initial policy from examples/bookinfo"
    # No identity configured anywhere (git_env): up set one in the repo it created.
    assert git(repo, "config", "--local", "user.email")

    status, body = get(page)
    assert status == 200 and b"<html" in body.lower()
    # `running` comes once every sidecar has the release and can have the endpoint table;
    # poll rather than trust a moment's slack on a loaded machine.
    end = time.monotonic() + 30
    while reviews_version(entry) is None:
        assert time.monotonic() < end, f"productpage never reached reviews:\n{up.output()}"
        time.sleep(0.2)
    before = [reviews_version(entry) for _ in range(10)]
    assert "v2" not in before and set(before) <= {"v1", "v3"}, before  # 80/20 v1/v3; jason alone gets v2

    mesh = repo / "mesh.star"
    text, count = re.subn(r"(?m)^route_reviews\(\)$", 'http_route("reviews", rules = [rule(backends = {"v2": 100})])', mesh.read_text())
    text, golden = re.subn(
        r"(?m)^golden_requests\(\)$",
        'request_test("everyone reads reviews v2", service = "reviews", source = "productpage", path = "/reviews/0", backends = "v2")',
        text,
    )
    text, rollouts = re.subn(r"rollout = rollout\([^)]*\)", "rollout = rollout(canary_percent = 0)", text)
    assert (count, golden, rollouts) == (1, 1, 1), "examples/bookinfo/policies/mesh.star changed shape: update this test"
    mesh.write_text(text)
    git(repo, "commit", "-qam", "reviews: everyone to v2, at once")

    streak, end = 0, time.monotonic() + 60
    while streak < 10:
        assert time.monotonic() < end, f"traffic did not follow the commit to reviews v2:\n{up.output()}"
        streak = streak + 1 if reviews_version(entry) == "v2" else 0
        if streak == 0:
            time.sleep(0.2)
    up.wait_line(lambda line: re.fullmatch(r"release 2 applied everywhere \(commit \w+\)", line) is not None, "release 2 line", 30)

    children = children_of(up.popen.pid)
    assert len(children) == 1 + 2 * 7, children  # the control plane; 7 apps, each with a sidecar
    token = (state / "join-token").read_text().strip()
    sidecars = [cmdline for cmdline in children.values() if " proxy " in cmdline]
    assert len(sidecars) == 7 and all(f"--ca-cert {ca_cert}" in cmdline for cmdline in sidecars), sidecars
    assert not any(token in cmdline for cmdline in sidecars), "the join token shows in a sidecar's argv"
    # Inside the mesh every hop is strict mTLS: details' sidecar closes a plaintext connection.
    details_inbound = re.search(r"^  details v1 .* inbound (\S+) ", up.output(), re.M)
    assert details_inbound is not None, up.output()
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        get(f"http://{details_inbound.group(1)}/details/0")
    assert up.interrupt() == 0, up.output()
    assert up.lines[-1] == "stopped", up.output()
    assert still_running(children) == []
    assert leftovers(state) == []


def test_a_second_up_on_the_same_state_dir_exits_2_and_the_first_keeps_running(tmp_path: Path, start_up: Callable[..., Up]) -> None:
    example = tiny_example(tmp_path / "tiny")
    git(example / "policies", "init", "-q", "-b", "main")  # the example's policies are a repo: used in place
    git(example / "policies", "add", "-A")
    git(example / "policies", "commit", "-qm", "tiny policy")
    state = tmp_path / "state"
    first = start_up(example, state)
    first.wait_line(lambda line: line == "running (Ctrl-C to stop)", "`running` line")
    assert Path(first.value("policy repo ")) == example / "policies"
    assert not (state / "repo").exists()

    second = subprocess.run(
        [sys.executable, "-m", "starmesh.cli", "up", str(example), "--state-dir", str(state)],
        cwd=ROOT, env=git_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 2, second
    pid = first.popen.pid
    assert (
        f"starmesh up is already running (pid {pid}, state in {state}); "
        "stop it with Ctrl-C in its terminal or use --state-dir"
    ) in second.stderr
    assert second.stdout == ""

    entry = first.value("web ")
    status, body = get(entry)
    assert status == 200 and json.loads(body) == {"service": "web", "version": "v1"}

    # A child that exits is reported, and the rest keep running.
    children = children_of(first.popen.pid)
    assert len(children) == 3, children
    app = next(pid for pid, cmdline in children.items() if str(example / "app.py") in cmdline)
    os.kill(app, signal.SIGTERM)
    first.wait_line(lambda line: line.startswith("app web-v1 exited with code 0") and "the rest keep running" in line, "exit line", 30)
    assert first.popen.poll() is None
    status, _ = get(entry)
    assert status == 503  # the sidecar answers: its app is gone

    assert first.interrupt() == 0, first.output()
    assert first.lines[-1] == "stopped"
    assert still_running(children) == []
    assert leftovers(state) == []


def test_on_a_terminal_up_shows_its_steps_what_runs_where_and_a_live_status(tmp_path: Path) -> None:
    example = tiny_example(tmp_path / "tiny")
    state = tmp_path / "state"
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = dict(git_env(tmp_path), TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "starmesh.cli", "up", str(example), "--state-dir", str(state)],
        cwd=ROOT, env=env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = bytearray()

    def read_until(done: Callable[[str], bool], what: str, deadline: float) -> str:
        end = time.monotonic() + deadline
        while True:
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
            if done(text):
                return text
            assert time.monotonic() < end, f"no {what} within {deadline}s:\n{text}"
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the terminal's last writer has gone
                    chunk = b""
                if not chunk:
                    assert done(text), f"the terminal closed before {what}:\n{text}"
                seen.extend(chunk)

    try:
        text = read_until(lambda t: "running: Ctrl-C to stop" in t, "live status", START_DEADLINE)
        steps = ("✓ lock", "✓ policy repo", "✓ signing key", "✓ mesh identity", "✓ control plane", "✓ apps and sidecars", "✓ sync")
        for step in steps:
            assert step in text, text
        assert "what runs where" in text and "next things to try:" in text
        assert re.search(r"web\s+v1\s+web-v1-[0-9a-f]{8}\s+synced\s+1", text), text  # the proxies table
        process.send_signal(signal.SIGINT)
        assert process.wait(STOP_DEADLINE) == 0
        read_until(lambda t: t.rstrip().endswith("stopped"), "`stopped`", 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(controller)
    assert leftovers(state) == []


def test_a_later_run_keeps_the_repo_with_its_commits_and_the_key(tmp_path: Path, start_up: Callable[..., Up]) -> None:
    example = tiny_example(tmp_path / "tiny")
    state = tmp_path / "state"
    first = start_up(example, state)
    first.wait_line(lambda line: line == "running (Ctrl-C to stop)", "`running` line")
    repo = Path(first.value("policy repo "))
    (repo / "mesh.star").write_text(TINY_POLICY + "# a comment: a new commit, a new release\n")
    git(repo, "commit", "-qam", "mine")
    first.wait_line(lambda line: line.startswith("release 2 applied everywhere"), "release 2 line", 30)
    key = (state / "keys" / "signing.key").read_bytes()
    ca, token = (state / "ca" / "ca.crt").read_bytes(), (state / "join-token").read_text()
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}\n", token), token
    assert (state / "join-token").stat().st_mode & 0o777 == 0o600
    assert (state / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert first.interrupt() == 0, first.output()

    again = start_up(example, state)
    again.wait_line(lambda line: line == "running (Ctrl-C to stop)", "`running` line")
    assert any(line.startswith(f"[2/7] policy repo: kept {repo} as it is") for line in again.lines), again.output()
    assert any(line.startswith("[3/7] signing key: reused") for line in again.lines), again.output()
    assert any(line.startswith(f"[4/7] mesh identity: reused {state / 'ca' / 'ca.crt'} (trust domain tiny.local)")
               for line in again.lines), again.output()  # fmt: skip
    assert git(repo, "log", "--format=%s").splitlines() == ["mine", "Initial policy from " + str(example)]
    assert (state / "keys" / "signing.key").read_bytes() == key
    assert (state / "ca" / "ca.crt").read_bytes() == ca and (state / "join-token").read_text() == token
    # The control plane kept its releases: it starts on release 2, the one for "mine".
    assert any(re.match(r"\[5/7\] control plane: https://\S+, release 2 ", line) for line in again.lines), again.output()
    assert again.interrupt() == 0, again.output()
    assert leftovers(state) == []


def test_a_first_policy_that_does_not_compile_exits_1_before_starting_anything(tmp_path: Path, start_up: Callable[..., Up]) -> None:
    # The first run makes the mesh CA for the policy's trust domain: no policy, no CA.
    example = tiny_example(tmp_path / "tiny", policy=TINY_POLICY + 'service(name = "web2", bogus = 1)\n')
    state = tmp_path / "state"
    up = start_up(example, state)
    assert up.popen.wait(START_DEADLINE) == 1, up.output()
    up.close()
    output = up.output()
    assert "starmesh: error: the policy at " in output and "so the mesh's trust domain for its CA is unknown" in output
    assert "bogus" in output  # the first diagnostic says why
    assert not (state / "ca").exists() and not (state / "logs").exists()  # nothing was started
    assert leftovers(state) == []


def test_a_policy_that_does_not_compile_with_a_ca_in_place_exits_1_and_stops_what_started(
    tmp_path: Path, start_up: Callable[..., Up]
) -> None:
    example = tiny_example(tmp_path / "tiny", policy=TINY_POLICY + 'service(name = "web2", bogus = 1)\n')
    state = tmp_path / "state"
    made = subprocess.run(
        [sys.executable, "-m", "starmesh.cli", "ca", "init", "--trust-domain", "tiny.local", "--out", str(state / "ca")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    up = start_up(example, state)
    assert up.popen.wait(START_DEADLINE) == 1, up.output()
    up.close()
    output = up.output()
    assert "starmesh: error: the control plane is not ready" in output
    assert "bogus" in output  # the first diagnostic says why
    assert output.splitlines()[-1] == "stopped"
    assert leftovers(state) == []
    assert (state / "logs" / "control-plane.log").is_file()


def test_an_app_that_fails_to_start_exits_1_naming_it_and_stops_the_rest(tmp_path: Path, start_up: Callable[..., Up]) -> None:
    example = tiny_example(tmp_path / "tiny")
    (example / "app.py").write_text('import sys\nsys.exit("no config for web, giving up")\n')
    state = tmp_path / "state"
    up = start_up(example, state)
    assert up.popen.wait(START_DEADLINE) == 1, up.output()
    up.close()
    output = up.output()
    log = state / "logs" / "app-web-v1.log"
    assert f"starmesh: error: app web-v1 exited with code 1 (log: {log}) before its `listening` line" in output
    assert "no config for web, giving up" in output  # its last lines
    assert "no config for web, giving up" in log.read_text()
    assert output.splitlines()[-1] == "stopped"
    assert leftovers(state) == []  # the control plane and the sidecar were stopped too


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: d, "no up.json in"),
        (lambda d: (d / "up.json").write_text("{") and d, "not a valid up.json"),
        (lambda d: (d / "up.json").write_text(json.dumps({"mesh": "m", "entry": {"service": "a"}, "apps": []})) and d,
         "policies 'policies': no such directory"),
    ],
    ids=["missing", "no-up-json", "bad-json", "no-policies"],
)  # fmt: skip
def test_a_bad_example_dir_exits_2(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    example = make(tmp_path)
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "starmesh.cli", "up", str(example), "--state-dir", str(state)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert done.stderr.startswith("starmesh: error: ") and message in done.stderr, done.stderr
    assert not state.exists()  # nothing is made for bad input


def test_without_git_up_exits_2_and_says_so(tmp_path: Path) -> None:
    example = tiny_example(tmp_path / "tiny")
    bare = tmp_path / "bin"
    bare.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "starmesh.cli", "up", str(example), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ, PATH=str(bare)),
    )  # fmt: skip
    assert done.returncode == 2, done
    assert "git is not installed" in done.stderr
