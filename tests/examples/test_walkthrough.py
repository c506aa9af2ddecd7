"""docs/walkthrough.md, run: every `$ ` command in it, in order, against a real `starmesh up`.

    docs/walkthrough.md ──console_commands()──► the `$ ` lines of its ```console blocks
                                                  │ must be, in order, the commands of STEPS
    STEPS: (command, what must hold) ─────────────┘
    starmesh up examples/bookinfo --state-dir TMP  (a subprocess; plain output, not a terminal)
      └─ its addresses ─► PRODUCTPAGE, CP, PRODUCTPAGE_ADMIN, DETAILS_ADMIN in the environment
    each command: bash -c, in the checkout, `.starmesh` → TMP; then its step's check
      (a step that waits for the mesh, e.g. a rollout's bake, re-runs its command until the
       check holds, up to a deadline)
    SIGINT ─► `up` exits 0 and every process it started is gone

The consistency tests are fast and always run; the end-to-end run takes a few minutes
(two rollouts bake for a minute each, as the walkthrough shows) and is marked slow.
Git runs without global or system config, so commits use the local identity `up` sets
in the repo it creates (DESIGN.md), as they would for a reader without one.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
VENV_BIN = Path(sys.executable).parent
"""The running venv's bin directory (not resolved: a venv's python is a symlink)."""

START_DEADLINE = 240.0
"""Seconds `up` may take to start everything (15 processes on a shared 2-core machine)."""
ROLLOUT_DEADLINE = 300.0
"""Seconds a rollout may take: the canary's ACK, the 1-minute bake, everyone's ACK."""
SHORT_DEADLINE = 60.0
"""Seconds for a change that needs no bake (a release to appear, a rollback to apply)."""
COMMAND_TIMEOUT = 60.0
"""Seconds one command may run."""
STOP_DEADLINE = 60.0
"""Seconds `up` may take to stop every child after SIGINT."""


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class DocCommand:
    """One `$ ` command of a console block and the line it starts on."""

    line: int
    text: str


_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def fenced_blocks(markdown: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line of the opening fence, language, body lines) of every fenced block; an
    unclosed fence is an AssertionError naming its line."""
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, language, start = opening.group(2), opening.group(3), index
        index += 1
        body: list[str] = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        assert index < len(lines), f"line {start + 1}: unclosed {fence} block"
        yield start + 1, language, body
        index += 1


def console_commands(markdown: str) -> list[DocCommand]:
    """The `$ ` lines of every ```console block, in order (a trailing `\\` continues a
    command on the next line)."""
    commands: list[DocCommand] = []
    for start, language, body in fenced_blocks(markdown):
        if language != "console":
            continue
        pending: list[str] = []
        first = 0
        for offset, line in enumerate(body, start=start + 1):
            if pending:
                pending.append(line.strip())
            elif line.startswith("$ "):
                pending, first = [line[2:].strip()], offset
            else:
                continue  # output
            if pending[-1].endswith("\\"):
                pending[-1] = pending[-1][:-1].rstrip()
                continue
            commands.append(DocCommand(first, " ".join(pending)))
            pending = []
        assert not pending, f"line {first}: the command ends with `\\` but its block ends"
    return commands


# --------------------------------------------------------------------------- running commands


@dataclass(frozen=True)
class Ran:
    """What one command did."""

    command: str
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise AssertionError(f"not JSON: {self.stdout!r}") from exc

    def describe(self) -> str:
        return f"$ {self.command}\nexit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


@dataclass
class Walk:
    """The running mesh as the walkthrough sees it: the variables, the state dir, notes."""

    env: dict[str, str] = field(repr=False)
    state: Path
    variables: dict[str, str]
    notes: dict[str, str] = field(default_factory=dict)

    def localize(self, command: str) -> str:
        """The command as the test runs it: this state dir, this venv."""
        return command.replace(".starmesh", str(self.state)).replace(".venv/bin/", f"{VENV_BIN}/")

    def run(self, command: str) -> Ran:
        done = subprocess.run(
            ["bash", "-c", self.localize(command)],
            cwd=ROOT,
            env={**self.env, **self.variables},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        return Ran(command, done.returncode, done.stdout, done.stderr)

    def status(self) -> dict[str, Any]:
        """The control plane's /v1/status (no HTTP proxy in the way)."""
        context = ssl.create_default_context(cafile=str(self.state / "ca" / "ca.crt"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
        with opener.open(f"{self.variables['CP']}/v1/status", timeout=10) as answer:
            document: dict[str, Any] = json.load(answer)
        return document


Check = Callable[[Ran, Walk], None]


@dataclass(frozen=True)
class Step:
    """A command of the walkthrough and what must hold after it."""

    command: str
    check: Check
    wait: float = 0.0
    """> 0: re-run the command until the check holds, for up to this many seconds."""
    by_fixture: bool = False
    """Done by the fixture, not run here: starting `up`, setting a variable from its output."""


# --------------------------------------------------------------------------- checks


def exits(code: int) -> Check:
    def check(ran: Ran, walk: Walk) -> None:
        assert ran.returncode == code, f"expected exit {code}"

    return check


def all_of(*checks: Check) -> Check:
    def check(ran: Ran, walk: Walk) -> None:
        for each in checks:
            each(ran, walk)

    return check


def output_has(*texts: str) -> Check:
    def check(ran: Ran, walk: Walk) -> None:
        output = ran.stdout + ran.stderr
        for text in texts:
            assert text in output, f"expected {text!r} in the output"

    return check


VARIABLES = {"PRODUCTPAGE", "CP", "PRODUCTPAGE_ADMIN", "DETAILS_ADMIN", "DETAILS", "REVIEWS_OUTBOUND"}


def mesh_started(ran: Ran, walk: Walk) -> None:
    assert walk.variables.keys() >= VARIABLES


def variable(name: str, scheme: str = "http") -> Check:
    def check(ran: Ran, walk: Walk) -> None:
        value = walk.variables.get(name, "")
        assert re.fullmatch(rf"{scheme}://127\.0\.0\.1:\d+", value), f"{name} from up's output: {value!r}"

    return check


def file_has(relative: str, text: str) -> Check:
    """The command succeeded and the file in the policy repo now holds `text`."""

    def check(ran: Ran, walk: Walk) -> None:
        assert ran.returncode == 0, "expected exit 0"
        content = (walk.state / "repo" / relative).read_text(encoding="utf-8")
        assert text in content, f"{relative} does not hold {text!r} after the edit"

    return check


def committed(message: str) -> Check:
    def check(ran: Ran, walk: Walk) -> None:
        assert ran.returncode == 0, "expected exit 0"
        done = subprocess.run(
            ["git", "-C", str(walk.state / "repo"), "log", "-1", "--format=%s"],
            env=walk.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True,
        )  # fmt: skip
        assert done.stdout.strip() == message

    return check


def served_by(**expected: object) -> Check:
    """`jq .served_by` (or a `{served_by, ...}` object) names these versions."""

    def check(ran: Ran, walk: Walk) -> None:
        assert ran.returncode == 0, "expected exit 0"
        data = ran.json()
        served = data.get("served_by", data)
        for service, want in expected.items():
            got = served.get(service)
            if isinstance(want, tuple):
                assert got in want, f"served_by.{service} is {got!r}, expected one of {want}"
            else:
                assert got == want, f"served_by.{service} is {got!r}, expected {want!r}"

    return check


def first_page_view(ran: Ran, walk: Walk) -> None:
    served_by(productpage="v1", details="v1", reviews=("v1", "v3"))(ran, walk)
    served = ran.json()
    # v1 shows no stars and calls nobody; v3 calls ratings v1.
    assert served["ratings"] == (None if served["reviews"] == "v1" else "v1"), served


def split_counts(allowed: set[str]) -> Check:
    """`... | sort | uniq -c` over 20 page views: only `allowed` versions, 20 in all."""

    def check(ran: Ran, walk: Walk) -> None:
        assert ran.returncode == 0, "expected exit 0"
        counts = {}
        for line in ran.stdout.splitlines():
            n, version = line.split()
            counts[version] = int(n)
        assert set(counts) <= allowed, f"versions {sorted(counts)}, expected only {sorted(allowed)}"
        assert sum(counts.values()) == 20, counts

    return check


def rollout_reached(version: int, phase: str | None = None) -> Check:
    """`starmesh status`: release `version` is the newest; its rollout is in `phase` (any if None)."""

    def check(ran: Ran, walk: Walk) -> None:
        assert ran.returncode == 0, "expected exit 0"
        assert re.search(rf"^release +{version} +bundle sha256:", ran.stdout, re.M), f"release {version} not yet"
        rollout = re.search(r"^rollout +(\w+) +release (\d+)", ran.stdout, re.M)
        assert rollout is not None and int(rollout.group(2)) == version, "no rollout of it yet"
        if phase is not None:
            assert rollout.group(1) == phase, f"rollout {rollout.group(1)}, waiting for {phase}"
            assert re.search(r"^proxies +7: 7 synced$", ran.stdout, re.M), "not every proxy synced yet"
        document = walk.status()
        walk.notes[f"bundle {version}"] = document["release"]["bundle"]

    return check


def first_status(ran: Ran, walk: Walk) -> None:
    rollout_reached(1, "complete")(ran, walk)
    assert re.search(r"^last compile +[0-9a-f]{12} +ok \(1 warning\)$", ran.stdout, re.M)
    assert ran.stdout.count("SM414") == 1 and "SM407" not in ran.stdout
    header = ["ID", "SERVICE", "VERSION", "RELEASE", "BUNDLE", "STATE", "BEHIND", "REQ/S", "ERROR", "LAST SEEN"]
    lines = ran.stdout.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("ID ")), None)
    assert at is not None and re.split(r"\s{2,}", lines[at].strip()) == header, "no per-proxy table"
    bundle = walk.notes["bundle 1"][:19]
    rows = [line.split() for line in lines[at + 2 :] if line.strip()]
    assert len(rows) == 7, rows
    for row in rows:
        # id, service, version, release 1, its bundle, synced, 0 behind, a rate, no error, last seen
        assert row[3:7] == ["1", bundle, "synced", "0"] and row[8] == "-", row
        assert re.fullmatch(r"\d+(\.\d+)?", row[7]), f"REQ/S {row[7]!r}"


def proxy_config(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    config = ran.json()
    assert config == {"release_version": 1, "bundle": walk.notes["bundle 1"], "origin": "control-plane"}


def reviews_metrics(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    line = re.compile(
        r'starmesh_requests_total\{destination_service="reviews",destination_version="(v[123])",'
        r'direction="outbound",reason="",response_code="200",source_service="productpage"\} (\d+)\.0'
    )
    counts: dict[str, int] = {}
    for text in ran.stdout.splitlines():
        found = line.fullmatch(text)
        assert found is not None, f"unexpected line {text!r}"
        counts[found.group(1)] = counts.get(found.group(1), 0) + int(found.group(2))
    # 22 page views so far: jason's went to v2, the other 21 to v1 or v3.
    assert counts.get("v2") == 1 and sum(counts.values()) == 22, counts


def explain_jason(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    answer = ran.json()
    assert answer["backends"] == {"v2": 100}
    assert answer["rule"]["index"] == 0 and answer["rule"]["file"] == "lib/routing.star"


def chaos(ran: Ran, walk: Walk) -> None:
    served_by(productpage="v1", details="v1", reviews="v2", ratings=None)(ran, walk)
    assert ran.json()["ratings_error"] == "503 fault"


def slow_tester(reviews: str | None, error: str | None) -> Check:
    def check(ran: Ran, walk: Walk) -> None:
        served_by(productpage="v1", details="v1", reviews=reviews)(ran, walk)
        assert ran.json()["errors"] == {"details": None, "reviews": error}

    return check


def timeout_logged(ran: Ran, walk: Walk) -> None:
    """The product page's access log has the 504 its sidecar answered for reviews."""
    assert ran.returncode == 0, "expected exit 0"
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert lines, "no line with reason timeout in productpage-v1's access log yet"
    for line in lines:
        assert {k: line[k] for k in ("service", "status", "reason")} == {
            "service": "reviews", "status": 504, "reason": "timeout"
        }, line  # fmt: skip
        assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] > 0, line


def denied(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    lines = [line.strip().lower() for line in ran.stdout.splitlines()]
    assert lines == ["http/1.1 403 forbidden", "x-starmesh-error: denied"], lines


def plaintext_refused(ran: Ran, walk: Walk) -> None:
    assert ran.returncode in (52, 56), "expected curl to fail: the connection closed without an answer"
    assert ran.stdout == "", "details' sidecar answered a plaintext call"


def inbound_connections(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    mtls = re.search(r'^starmesh_inbound_connections_total\{transport="mtls"\} (\d+)\.0$', ran.stdout, re.M)
    refused = re.search(r'^starmesh_inbound_connections_refused_total\{reason="plaintext"\} (\d+)\.0$', ran.stdout, re.M)
    assert mtls is not None and int(mtls.group(1)) > 0, "no mTLS connections counted"
    assert refused is not None and int(refused.group(1)) >= 1, "the plaintext connection was not counted as refused"
    plaintext = re.search(r'^starmesh_inbound_connections_total\{transport="plaintext"\} (\d+)\.0$', ran.stdout, re.M)
    assert plaintext is None or int(plaintext.group(1)) == 0, "details (strict) accepted a plaintext connection"


def rolled_back(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    assert ran.stdout.startswith(f"release 4 now serves {walk.notes['bundle 2']}\n"), "not release 2's bundle"


def rollback_applied(ran: Ran, walk: Walk) -> None:
    rollout_reached(4, "complete")(ran, walk)
    assert re.search(r"^release +4 .*\(rollback\)$", ran.stdout, re.M)
    assert walk.notes["bundle 4"] == walk.notes["bundle 2"]


def diff_preview(ran: Ran, walk: Walk) -> None:
    """`starmesh diff` of the uncommitted split change: one traffic shift, the golden
    request it updates, and the requests whose destination moves."""
    assert ran.returncode == 0, "expected exit 0"
    lines = ran.stdout.splitlines()
    assert lines[1].startswith("base  HEAD (") and lines[2].startswith("head  working tree  sha256:"), lines[:3]
    [change] = [line for line in lines if "[shifts 100% of traffic]" in line]
    assert "v1 80% → 0%, v2 0% → 100%, v3 20% → 0%" in change and change.endswith("lib/routing.star:12"), change
    assert "1 change in behaviour: 1 shifts 100% of traffic" in lines
    assert '  changed: "everyone but jason gets the general reviews split"' in lines
    assert "requests: 15 tried, 2 changed" in lines
    rows = [re.split(r"\s{2,}", line) for line in lines if line.startswith("everyone but jason gets the general ")]
    assert rows == [[
        "everyone but jason gets the general reviews split", "golden", "v1 80%, v2 0%, v3 20%", "v1 0%, v2 100%, v3 0%",
        "destination",
    ]], rows  # fmt: skip


def diff_against_rollback(ran: Ran, walk: Walk) -> None:
    """`diff HEAD --against $CP` after the rollback: release 4 (release 2's bundle) runs;
    HEAD is release 3's commit, the delay fault and the 1 s timeout."""
    assert ran.returncode == 0, "expected exit 0"
    lines = ran.stdout.splitlines()
    base = f"base  control plane {walk.variables['CP']} (release 4)  {walk.notes['bundle 2'][:19]}"
    assert lines[1] == base, lines[:3]
    assert lines[2].startswith("head  HEAD ("), lines[:3]
    [fault] = [line for line in lines if "[adds faults]" in line]
    assert "delay 1500ms for 100%" in fault and fault.endswith("lib/routing.star:32"), fault
    assert any(line.startswith("  reviews: timeout 2500ms → 1s") for line in lines), lines
    assert "2 changes in behaviour: 1 adds faults" in lines


def diff_revert(ran: Ran, walk: Walk) -> None:
    assert ran.returncode == 0, "expected exit 0"
    lines = ran.stdout.splitlines()
    assert "no change in behaviour" in lines and "requests: 15 tried, 0 changed" in lines, lines


# --------------------------------------------------------------------------- the steps

CA = "--ca-cert .starmesh/ca/ca.crt"
STATUS = f"starmesh status --control-plane $CP {CA}"
VIEWS = "for i in $(seq 20); do curl -s $PRODUCTPAGE/api/v1/products/0 | jq -r .served_by.reviews; done | sort | uniq -c"
LINT = "starmesh lint .starmesh/repo"
LINT_CLEAN = all_of(exits(0), output_has("Found 0 errors and 1 warning."))
SLOW = "curl -s -H 'end-user: slow-tester' $PRODUCTPAGE/api/v1/products/0 | jq '{served_by, errors}'"
SPLIT_TO_V2 = '{"v1": 0, "v2": 100, "v3": 0}'

STEPS: list[Step] = [
    # 1. start
    Step(".venv/bin/starmesh up", mesh_started, by_fixture=True),
    Step("source .venv/bin/activate", exits(0)),
    Step("PRODUCTPAGE=http://127.0.0.1:PORT", variable("PRODUCTPAGE"), by_fixture=True),
    Step("CP=https://127.0.0.1:PORT", variable("CP", "https"), by_fixture=True),
    Step("PRODUCTPAGE_ADMIN=http://127.0.0.1:PORT", variable("PRODUCTPAGE_ADMIN"), by_fixture=True),
    Step("DETAILS_ADMIN=http://127.0.0.1:PORT", variable("DETAILS_ADMIN"), by_fixture=True),
    Step("DETAILS=http://127.0.0.1:PORT", variable("DETAILS"), by_fixture=True),
    Step("REVIEWS_OUTBOUND=http://127.0.0.1:PORT", variable("REVIEWS_OUTBOUND"), by_fixture=True),
    # 2. look
    Step("curl -s $PRODUCTPAGE/api/v1/products/0 | jq .served_by", first_page_view),
    Step(VIEWS, split_counts({"v1", "v3"})),
    Step("curl -s -H 'end-user: jason' $PRODUCTPAGE/api/v1/products/0 | jq .served_by.reviews", output_has('"v2"\n')),
    Step(STATUS, first_status, wait=SHORT_DEADLINE),
    Step("curl -s $PRODUCTPAGE_ADMIN/config | jq '{release_version, bundle, origin}'", proxy_config),
    Step(
        "curl -s $PRODUCTPAGE_ADMIN/metrics "
        "| grep '^starmesh_requests_total{destination_service=\"reviews\",.*direction=\"outbound\"'",
        reviews_metrics,
    ),
    Step(
        "curl -s \"$PRODUCTPAGE_ADMIN/explain?service=reviews&path=/reviews/0&header=end-user:jason\" "
        "| jq -c '{rule, backends}'",
        explain_jason,
    ),
    # 3. change the policy
    Step(
        f"sed -i 's/{{\"v1\": 80, \"v2\": 0, \"v3\": 20}}/{SPLIT_TO_V2}/' .starmesh/repo/lib/routing.star",
        file_has("lib/routing.star", SPLIT_TO_V2),
    ),
    Step(
        LINT,
        all_of(
            exits(1),
            output_has('SM501 error: request_test "everyone but jason gets the general reviews split"'),
            output_has("Found 1 error and 1 warning."),
        ),
    ),
    Step(
        "sed -i 's/backends = {\"v1\": 80, \"v3\": 20}/backends = {\"v2\": 100}/' .starmesh/repo/lib/golden.star",
        file_has("lib/golden.star", 'backends = {"v2": 100}'),
    ),
    Step(LINT, LINT_CLEAN),
    Step("starmesh diff --repo .starmesh/repo", diff_preview),
    Step('git -C .starmesh/repo commit -am "reviews: everyone on v2"', committed("reviews: everyone on v2")),
    # 4. the rollout and the traffic shift
    Step(STATUS, rollout_reached(2), wait=SHORT_DEADLINE),
    Step(STATUS, rollout_reached(2, "complete"), wait=ROLLOUT_DEADLINE),
    Step(VIEWS, split_counts({"v2"})),
    # 5. a fault and a timeout
    Step(
        "curl -s -H 'end-user: chaos-tester' $PRODUCTPAGE/api/v1/products/0 "
        "| jq '{served_by, ratings_error: .reviews.ratings_error}'",
        chaos,
    ),
    Step(
        "sed -i 's/delay = \"200ms\", delay_percent = 50/delay = \"1500ms\", delay_percent = 100/' "
        ".starmesh/repo/lib/routing.star",
        file_has("lib/routing.star", 'delay = "1500ms", delay_percent = 100'),
    ),
    Step(
        "sed -i 's/standard_resilience(\"2500ms\"/standard_resilience(\"1s\"/' .starmesh/repo/lib/resilience.star",
        file_has("lib/resilience.star", 'standard_resilience("1s"'),
    ),
    Step(LINT, LINT_CLEAN),
    Step(
        'git -C .starmesh/repo commit -am "slow-tester: 1.5s delay; reviews: 1s timeout"',
        committed("slow-tester: 1.5s delay; reviews: 1s timeout"),
    ),
    Step(STATUS, rollout_reached(3, "complete"), wait=ROLLOUT_DEADLINE),
    Step(SLOW, slow_tester(reviews=None, error="504 timeout"), wait=SHORT_DEADLINE),
    Step(
        "jq -c 'select(.reason == \"timeout\") | {service, status, reason, duration_ms}' "
        ".starmesh/proxies/productpage-v1/access.log",
        timeout_logged,
        wait=SHORT_DEADLINE,  # the log's writer flushes every 200 ms
    ),
    # 6. authorization denies, on methods and paths and on the caller mTLS proves
    Step("curl -si -X DELETE $PRODUCTPAGE/productpage | grep -i -e '^HTTP/' -e '^x-starmesh-error'", denied),
    Step("curl -si -H 'Host: details' $REVIEWS_OUTBOUND/details/0 | grep -i -e '^HTTP/' -e '^x-starmesh-error'", denied),
    Step("curl -sS $DETAILS/details/0", plaintext_refused),
    Step("curl -s $DETAILS_ADMIN/metrics | grep '^starmesh_inbound_connections'", inbound_connections),
    # 7. roll back
    Step(
        f"starmesh rollback --control-plane $CP {CA} "
        f"--to $(starmesh status --control-plane $CP {CA} --format json | jq -r .release.previous)",
        rolled_back,
    ),
    Step(STATUS, rollback_applied, wait=SHORT_DEADLINE),
    Step(SLOW, slow_tester(reviews="v2", error=None), wait=SHORT_DEADLINE),
    Step(f"starmesh diff HEAD --repo .starmesh/repo --against $CP {CA}", diff_against_rollback),
    Step("git -C .starmesh/repo revert --no-edit HEAD", exits(0)),
    Step(STATUS, rollout_reached(5), wait=SHORT_DEADLINE),
    Step("starmesh diff HEAD~2 HEAD --repo .starmesh/repo", diff_revert),
]


# --------------------------------------------------------------------------- the page and the steps agree


def test_every_command_of_the_walkthrough_has_a_step_and_every_step_a_command() -> None:
    documented = [command.text for command in console_commands(WALKTHROUGH.read_text(encoding="utf-8"))]
    expected = [step.command for step in STEPS]
    if documented != expected:
        diff = "\n".join(difflib.unified_diff(expected, documented, "STEPS (this test)", "docs/walkthrough.md", lineterm=""))
        pytest.fail(f"docs/walkthrough.md and this test's STEPS disagree; a command changed on one side only:\n{diff}")


def test_every_command_is_in_a_console_block() -> None:
    """Commands are `$ ` lines of ```console blocks, so the parser (and the test) sees them."""
    for line, language, body in fenced_blocks(WALKTHROUGH.read_text(encoding="utf-8")):
        assert language in ("console", "python", ""), f"docs/walkthrough.md line {line}: a ```{language} block"
        if language != "console":
            assert not any(text.startswith("$ ") for text in body), f"docs/walkthrough.md line {line}: a command outside a console block"


def test_the_readme_links_the_walkthrough() -> None:
    assert "](docs/walkthrough.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_console_commands_parser() -> None:
    page = "\n".join([
        "text $ not a command",
        "```console",
        "$ echo one",
        "one",
        "$ echo two \\",
        "    three",
        "```",
        "```sh",
        "$ not console",
        "```",
        "~~~console",
        "$ echo four",
        "~~~",
    ])  # fmt: skip
    assert console_commands(page) == [
        DocCommand(3, "echo one"),
        DocCommand(5, "echo two three"),
        DocCommand(12, "echo four"),
    ]
    with pytest.raises(AssertionError, match="line 1: unclosed"):
        console_commands("```console\n$ echo\n")
    with pytest.raises(AssertionError, match="line 2: the command ends with"):
        console_commands("```console\n$ echo \\\n```\n")


# --------------------------------------------------------------------------- the mesh


@dataclass
class Up:
    """`starmesh up` as a subprocess: its stdout lines, collected by a thread."""

    process: subprocess.Popen[str]
    stderr: Path
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None

    def start_reading(self) -> None:
        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                with self.changed:
                    self.lines.append(line.rstrip("\n"))
                    del self.lines[:-5000]  # bounded: the change lines go on while it runs
                    self.changed.notify_all()
            with self.changed:
                self.changed.notify_all()

        self.reader = threading.Thread(target=read, name="starmesh up stdout", daemon=True)
        self.reader.start()

    def wait_for_line(self, wanted: str, deadline: float) -> list[str]:
        """Every line so far, once `wanted` is one of them; fails if `up` exits first."""
        end = time.monotonic() + deadline
        with self.changed:
            while wanted not in self.lines:
                assert self.process.poll() is None, f"starmesh up exited {self.process.returncode}:\n{self.report()}"
                left = end - time.monotonic()
                assert left > 0, f"no {wanted!r} from starmesh up within {deadline:.0f}s:\n{self.report()}"
                self.changed.wait(min(left, 1.0))
            return list(self.lines)

    def report(self) -> str:
        with self.changed:
            out = "\n".join(self.lines[-60:])
        err = self.stderr.read_text(encoding="utf-8", errors="replace")[-4000:] if self.stderr.exists() else ""
        return f"--- stdout (last lines)\n{out}\n--- stderr\n{err}"


def _children_of() -> dict[int, list[int]]:
    """ppid → pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children_of(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        GIT_CONFIG_GLOBAL=os.devnull,  # a reader with no Git identity: `up` sets one in its repo
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(home),
        LC_ALL="C",
        PYTHONUNBUFFERED="1",
    )
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        env.pop(name, None)
    return env


_SERVICE_LINE = re.compile(
    r"^\s+(\S+) (\S+)\s+app \S+\s+sidecar outbound (\S+)\s+inbound (\S+)\s+admin (http://\S+) "
)


def addresses(lines: list[str]) -> dict[str, str]:
    """The walkthrough's variables (VARIABLES) from up's plain output."""
    found: dict[str, str] = {}
    for line in lines:
        if line.startswith("productpage http://"):
            found["PRODUCTPAGE"] = line.split()[1].removesuffix("/productpage")
        elif line.startswith("control plane https://"):
            found["CP"] = line.split()[2]
        elif (service := _SERVICE_LINE.match(line)) is not None and service.group(2) == "v1":
            name, outbound, inbound, admin = service.group(1), service.group(3), service.group(4), service.group(5)
            if name in ("productpage", "details"):
                found[f"{name.upper()}_ADMIN"] = admin
            if name == "details":
                found["DETAILS"] = f"http://{inbound}"
            if name == "reviews":
                found["REVIEWS_OUTBOUND"] = f"http://{outbound}"
    return found


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    """A running `starmesh up` of examples/bookinfo; stopped with SIGINT, every process gone."""
    missing = [tool for tool in ("bash", "curl", "jq", "git", "sed", "grep") if shutil.which(tool) is None]
    assert not missing, f"the walkthrough's commands need {', '.join(missing)}: install them (Debian: apt-get install {' '.join(missing)})"
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state"
    env = _environment(home)
    stderr = tmp_path / "up.stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "starmesh.cli", "up", "examples/bookinfo", "--state-dir", str(state)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            text=True, start_new_session=True,
        )  # fmt: skip
    up = Up(process, stderr)
    up.start_reading()
    started: set[int] = set()
    try:
        lines = up.wait_for_line("running (Ctrl-C to stop)", START_DEADLINE)
        started = descendants(process.pid)
        assert f"policy repo {state / 'repo'}" in lines, up.report()
        yield Walk(env, state, addresses(lines))
        started |= descendants(process.pid)
        process.send_signal(signal.SIGINT)  # Ctrl-C reaches `up` only: its children have their own groups
        try:
            code = process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"starmesh up did not stop within {STOP_DEADLINE:.0f}s of SIGINT:\n{up.report()}")
        assert code == 0, f"starmesh up exited {code} after SIGINT:\n{up.report()}"
        assert up.reader is not None
        up.reader.join(STOP_DEADLINE)
        assert up.lines[-1] == "stopped", up.report()
        end = time.monotonic() + 15
        while any(alive(pid) for pid in started) and time.monotonic() < end:
            time.sleep(0.1)
        left = sorted(pid for pid in started if alive(pid))
        assert not left, f"processes left behind by starmesh up: {left}"
    finally:
        started |= descendants(process.pid) if process.poll() is None else set()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_DEADLINE)
        for pid in started:  # children lead their own process groups
            if alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if up.reader is not None:
            up.reader.join(STOP_DEADLINE)
        if process.stdout is not None:
            process.stdout.close()


def _perform(step: Step, walk: Walk) -> None:
    if step.by_fixture:
        step.check(Ran(step.command, 0, "", ""), walk)
        return
    end = time.monotonic() + step.wait
    while True:
        ran = walk.run(step.command)
        try:
            step.check(ran, walk)
            return
        except AssertionError as exc:
            if time.monotonic() >= end:
                waited = f" (re-run for {step.wait:.0f}s)" if step.wait else ""
                raise AssertionError(f"walkthrough step failed{waited}: {exc}\n{ran.describe()}") from exc
        time.sleep(2.0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_walkthrough_end_to_end(walk: Walk) -> None:
    documented = [command.text for command in console_commands(WALKTHROUGH.read_text(encoding="utf-8"))]
    assert documented == [step.command for step in STEPS], "see test_every_command_of_the_walkthrough_has_a_step..."
    for step in STEPS:
        _perform(step, walk)
