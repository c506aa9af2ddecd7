"""`starmesh diff` on real Git repositories: which sides, the three formats, exit codes, errors.

    tmp_path/repo (git, branch main) ── commits ──► starmesh diff [BASE [HEAD]] (CliRunner)
                  └── mesh.star edited in the work tree (the default head)

Each test builds its repository with the `h` fixture (tests/cli/conftest.py) and reads
the command's stdout and stderr. The renderers are also checked on hand-built reports
(preview/model.py), so their layout is pinned independently of the comparison.
`--against` a running control plane is tests/cli/test_diff_against.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from starmesh.cli.console import make_console
from starmesh.cli.diff_render import describe_outcome, render_markdown, render_text, tally
from starmesh.cli.main import main
from starmesh.preview.model import (
    NARROWS_ACCESS,
    REMOVES_PROTECTION,
    WIDENS_ACCESS,
    Change,
    DiffReport,
    Outcome,
    RequestImpact,
    Side,
    TestChanges as GoldenChanges,
    shifts_traffic,
)

POLICY = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [rule(backends = {{"v1": {v1}, "v2": {v2}}})])

request_test(name = "reviews answer", service = "reviews", path = "/reviews/1")
"""

REFORMATTED = """\
# The shop's mesh: the same policy as POLICY, commented and laid out differently.
mesh(
    name = "shop",
)

# Reviews has two versions.
service(
    name = "reviews",
    versions = ["v1", "v2"],
)

http_route(
    service = "reviews",
    rules = [
        rule(backends = {{"v2": {v2}, "v1": {v1}}}),  # keys in another order
    ],
)

request_test(name = "reviews answer", service = "reviews", path = "/reviews/1")
"""

JASON = """\
mesh(name = "shop")

service(name = "reviews", versions = ["v1", "v2"])

http_route(service = "reviews", rules = [
    rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100}),
    rule(backends = {"v1": 100, "v2": 0}),
])

request_test(name = "reviews answer", service = "reviews", path = "/reviews/1")
"""

BROKEN = POLICY.format(v1=80, v2=10)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "FORCE_COLOR": None})


def diff(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(main, ["diff", *args], catch_exceptions=False)


@pytest.fixture
def repo(tmp_path: Path, h: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository whose HEAD sends all of reviews to v1; the cwd is its top."""
    path = h.make_repo(tmp_path / "repo")
    h.commit(path, POLICY.format(v1=100, v2=0), "all to v1")
    monkeypatch.chdir(path)
    return path


def edit(repo: Path, text: str) -> None:
    (repo / "mesh.star").write_text(text, encoding="utf-8")


def as_json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def kinds(document: dict[str, Any]) -> list[str]:
    return [change["kind"] for change in document["changes"]]


# -- which sides -------------------------------------------------------------------------------


def test_no_revision_compares_head_with_the_working_tree(runner: CliRunner, repo: Path, h: Any) -> None:
    head = h.git(repo, "rev-parse", "HEAD")
    assert as_json(diff(runner, "--format", "json"))["changes"] == []  # the work tree is HEAD

    edit(repo, POLICY.format(v1=50, v2=50))
    document = as_json(diff(runner, "--format", "json"))
    assert document["behaviour_changed"] is True
    assert document["base"] == {"label": f"HEAD ({head[:12]})", "commit": head, "digest": document["base"]["digest"]}
    assert document["head"]["label"] == "working tree" and document["head"]["commit"] is None
    assert document["base"]["digest"].startswith("sha256:") and document["head"]["digest"] != document["base"]["digest"]
    [change] = document["changes"]
    assert change["kind"] == "traffic.shift" and change["service"] == "reviews"
    assert change["risk"] == [shifts_traffic(50)]
    assert (change["file"], change["line"]) == ("mesh.star", 5)


def test_one_revision_is_the_base_against_the_working_tree(runner: CliRunner, repo: Path, h: Any) -> None:
    first = h.git(repo, "rev-parse", "HEAD")
    h.commit(repo, POLICY.format(v1=50, v2=50), "half to v2")
    assert as_json(diff(runner, "HEAD", "--format", "json"))["changes"] == []
    document = as_json(diff(runner, first[:10], "--format", "json"))
    assert document["base"]["label"] == f"{first[:10]} ({first[:12]})" and document["base"]["commit"] == first
    assert document["head"]["label"] == "working tree"
    assert kinds(document) == ["traffic.shift"]


def test_two_revisions_compare_commits_not_the_working_tree(runner: CliRunner, repo: Path, h: Any) -> None:
    first = h.git(repo, "rev-parse", "HEAD")
    second = h.commit(repo, POLICY.format(v1=50, v2=50), "half to v2")
    edit(repo, BROKEN)  # the work tree does not even compile: it must not be read
    document = as_json(diff(runner, "HEAD~1", "HEAD", "--format", "json"))
    assert document["base"]["commit"] == first and document["head"]["commit"] == second
    assert document["head"]["label"] == f"HEAD ({second[:12]})"
    assert kinds(document) == ["traffic.shift"]
    assert as_json(diff(runner, "HEAD", "HEAD", "--format", "json"))["behaviour_changed"] is False


def test_the_policy_root_may_be_a_folder_of_the_repository(
    runner: CliRunner, tmp_path: Path, h: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = h.make_repo(tmp_path / "monorepo")
    policies = repo / "deploy" / "policies"
    policies.mkdir(parents=True)
    (repo / "mesh.star").write_text("this is not the policy, and not Starlark either (\n", encoding="utf-8")
    (policies / "mesh.star").write_text(POLICY.format(v1=100, v2=0), encoding="utf-8")
    h.git(repo, "add", ".")
    h.git(repo, "commit", "-q", "-m", "policy in a folder")
    (policies / "mesh.star").write_text(POLICY.format(v1=0, v2=100), encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    document = as_json(diff(runner, "--repo", "monorepo/deploy/policies", "--format", "json"))
    [change] = document["changes"]
    assert change["kind"] == "traffic.shift" and change["file"] == "mesh.star"  # JSON: relative to the policy root
    text = diff(runner, "--repo", "monorepo/deploy/policies")
    assert text.exit_code == 0, text.output
    assert "monorepo/deploy/policies/mesh.star:5" in text.stdout  # text: relative to the cwd, as lint shows files

    monkeypatch.chdir(policies)  # from inside the folder, the default --repo . finds the repository above
    assert kinds(as_json(diff(runner, "--format", "json"))) == ["traffic.shift"]


# -- behaviour only ------------------------------------------------------------------------------


def test_a_comments_and_formatting_change_is_no_change_in_behaviour(runner: CliRunner, repo: Path) -> None:
    edit(repo, REFORMATTED.format(v1=100, v2=0))
    result = diff(runner, "--exit-code")
    assert result.exit_code == 0, result.output
    assert "no change in behaviour" in result.stdout
    document = as_json(diff(runner, "--format", "json", "--exit-code"))
    assert document["behaviour_changed"] is False and document["changes"] == []
    assert document["base"]["digest"] != document["head"]["digest"]  # other bytes, same behaviour
    markdown = diff(runner, "--format", "markdown", "--exit-code")
    assert markdown.exit_code == 0 and "No change in behaviour." in markdown.stdout


def test_exit_code_is_1_when_behaviour_changed_and_only_with_the_flag(runner: CliRunner, repo: Path) -> None:
    edit(repo, POLICY.format(v1=60, v2=40))
    for output_format in ("text", "json", "markdown"):
        assert diff(runner, "--format", output_format).exit_code == 0
        changed = diff(runner, "--format", output_format, "--exit-code")
        assert changed.exit_code == 1, changed.output
        assert changed.stdout  # the report is printed all the same
    assert diff(runner, "HEAD", "HEAD", "--exit-code").exit_code == 0


# -- the formats -------------------------------------------------------------------------------------


def test_text_shows_the_sides_each_change_with_its_risk_and_place_and_a_tally(runner: CliRunner, repo: Path) -> None:
    edit(repo, POLICY.format(v1=50, v2=50))
    result = diff(runner)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "starmesh diff"
    assert lines[1].startswith("base  HEAD (") and "sha256:" in lines[1]
    assert lines[2].startswith("head  working tree  sha256:")
    assert "reviews" in lines
    [change] = [line for line in lines if "[shifts 50% of traffic]" in line]
    assert change.startswith("  reviews") and change.endswith("  mesh.star:5"), change
    assert "1 change in behaviour: 1 shifts 50% of traffic" in lines
    assert all(line == line.rstrip() for line in lines)


def test_json_has_the_design_keys(runner: CliRunner, repo: Path) -> None:
    edit(repo, POLICY.format(v1=50, v2=50))
    result = diff(runner, "--format", "json")
    document = as_json(result)
    assert result.stdout == json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    assert {"behaviour_changed", "changes", "base", "head", "requests", "request_tests"} <= document.keys()
    for change in document["changes"]:
        assert change.keys() == {"service", "kind", "summary", "old", "new", "risk", "file", "line"}
    assert document["request_tests"] == {"added": [], "removed": [], "changed": []}


def test_markdown_is_a_pull_request_comment_with_a_table(runner: CliRunner, repo: Path, h: Any) -> None:
    head = h.git(repo, "rev-parse", "HEAD")
    edit(repo, POLICY.format(v1=50, v2=50))
    result = diff(runner, "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"### starmesh diff: HEAD ({head[:12]}) → working tree"
    assert "**1 change in behaviour: 1 shifts 50% of traffic**" in lines
    table = lines.index("| Service | Change | Risk | Policy |")
    assert lines[table + 1] == "|---|---|---|---|"
    row = lines[table + 2]
    assert row.startswith("| reviews | ") and row.endswith(" | **shifts 50% of traffic** | `mesh.star:5` |"), row


# -- requests ------------------------------------------------------------------------------------------


def test_requests_show_where_each_went_and_flag_the_changed_ones(runner: CliRunner, repo: Path, tmp_path: Path) -> None:
    edit(repo, JASON)
    requests = tmp_path / "requests.json"
    requests.write_text(
        json.dumps([
            {"name": "jason reads", "service": "reviews", "path": "/reviews/1", "headers": {"end-user": "jason"}},
            {"service": "reviews", "path": "/reviews/2"},
        ]),
        encoding="utf-8",
    )  # fmt: skip
    document = as_json(diff(runner, "--requests", str(requests), "--format", "json"))
    by_name = {r["name"]: r for r in document["requests"]}
    assert [r["origin"] for r in document["requests"]] == ["golden", "file", "file"]  # golden requests first
    assert by_name["reviews answer"]["changed"] == []
    jason = by_name["jason reads"]
    assert jason["changed"] == ["destination"]
    assert jason["before"]["backends"] == {"v1": 100, "v2": 0} and jason["after"]["backends"] == {"v2": 100}
    assert by_name["GET /reviews/2 → reviews"]["changed"] == []

    text = diff(runner, "--requests", str(requests))
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert "requests: 3 tried, 1 changed" in lines
    header = lines.index("requests: 3 tried, 1 changed") + 1
    assert lines[header].split() == ["REQUEST", "FROM", "BEFORE", "AFTER", "CHANGED"]
    rows = [re.split(r"\s{2,}", line) for line in lines[header + 1 : header + 4]]
    assert rows[0] == ["jason reads", "file", "v1 100%, v2 0%", "v2 100%", "destination"]  # changed ones first
    assert rows[1] == ["reviews answer", "golden", "v1 100%, v2 0%", "v1 100%, v2 0%", "-"]

    markdown = diff(runner, "--requests", str(requests), "--format", "markdown").stdout
    assert "| jason reads | file | v1 100%, v2 0% | v2 100% | **destination** |" in markdown


def test_golden_requests_are_always_tried_and_their_changes_reported(runner: CliRunner, repo: Path) -> None:
    renamed = POLICY.format(v1=100, v2=0).replace('name = "reviews answer"', 'name = "reviews still answer"')
    edit(repo, renamed)
    result = diff(runner, "--format", "json", "--exit-code")
    document = as_json(result)  # a golden request is a check, not behaviour
    assert document["request_tests"] == {"added": ["reviews still answer"], "removed": ["reviews answer"], "changed": []}
    assert sorted(r["name"] for r in document["requests"] if r["origin"] == "golden") == [
        "reviews answer",
        "reviews still answer",
    ]
    text = diff(runner).stdout
    assert "no change in behaviour" in text
    assert '  added: "reviews still answer"' in text and '  removed: "reviews answer"' in text


# -- bad input ----------------------------------------------------------------------------------------


def one_error_line(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"starmesh: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_an_unknown_revision_is_exit_2(runner: CliRunner, repo: Path) -> None:
    one_error_line(diff(runner, "no-such-branch"), f"{repo}: unknown revision 'no-such-branch'")
    one_error_line(diff(runner, "HEAD", "v9.9"), f"{repo}: unknown revision 'v9.9'")


def test_outside_a_repository_a_revision_is_exit_2(runner: CliRunner, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "mesh.star").write_text(POLICY.format(v1=100, v2=0), encoding="utf-8")
    one_error_line(diff(runner, "--repo", str(plain)), f"{plain.resolve()} is not in a Git repository")
    one_error_line(diff(runner, "--repo", str(tmp_path / "nowhere")), f"--repo {tmp_path / 'nowhere'}: no such directory")


def test_the_arguments_are_checked(runner: CliRunner, repo: Path) -> None:
    one_error_line(diff(runner, "a", "b", "c"), "too many revisions (a b c): starmesh diff takes [BASE [HEAD]]")
    one_error_line(
        diff(runner, "--against", "http://127.0.0.1:9", "a", "b"),
        "too many revisions (a b): starmesh diff takes --against URL [HEAD]",
    )
    one_error_line(diff(runner, "--ca-cert", "ca.crt"), "--ca-cert is for --against an https:// control plane")
    missing = diff(runner, "--entry", "nope.star")
    assert missing.exit_code == 2 and "has no entry file nope.star" in missing.stderr, missing.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        ("[{]", "not valid JSON"),
        ('{"service": "reviews"}', "expected a JSON array of requests"),
        ('[{"path": "/"}]', "item 1"),
    ],
)
def test_a_bad_requests_file_is_exit_2(runner: CliRunner, repo: Path, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "requests.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = diff(runner, "--requests", str(path))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"starmesh: error: --requests {path}"), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_side_that_does_not_compile_prints_its_findings_and_exits_2(runner: CliRunner, repo: Path, h: Any) -> None:
    edit(repo, BROKEN)
    result = diff(runner)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "mesh.star:5:" in result.stderr and "sum to 90" in result.stderr  # the finding, as compile shows it
    assert result.stderr.rstrip().endswith(
        "starmesh: error: working tree does not compile (1 error); fix it, or compare other revisions"
    ), result.stderr

    broken = h.commit(repo, BROKEN, "broken")
    h.commit(repo, POLICY.format(v1=100, v2=0), "fixed")
    result = diff(runner, "HEAD~1", "HEAD")
    assert result.exit_code == 2, result.output
    assert "mesh.star:5:" in result.stderr
    assert f"starmesh: error: HEAD~1 ({broken[:12]}) does not compile (1 error)" in result.stderr


# -- the renderers on a hand-built report ------------------------------------------------------------

BASE = Side("origin/main (3f2a9c1e4b7d)", "3f2a9c1e4b7d" + "0" * 28, "sha256:" + "a" * 64)
HEAD = Side("working tree", None, "sha256:" + "b" * 64)
CHANGES = (
    Change(None, "mesh.mtls", "mesh: mtls strict → permissive", "strict", "permissive", ("relaxes mTLS", WIDENS_ACCESS), "mesh.star", 1),
    Change("ratings", "access.gained", "reviews → ratings GET /ratings/* now allowed", None, None, (WIDENS_ACCESS,), "lib/access.star", 9),
    Change("reviews", "traffic.shift", "reviews: v1 90% → 50%, v2 10% → 50%", None, None, (shifts_traffic(40),), "lib/routing.star", 12),
    Change("reviews", "route.timeout", "reviews rules[1]: timeout 1s → none", "1s", None, (REMOVES_PROTECTION,), "lib/routing.star", 14),
    Change("reviews", "route.headers", "reviews rules[1]: sets `x|y` header <b>", None, None, (), "lib/a|b.star", 20),
    Change("reviews", "access.lost", "details → reviews GET * now denied", None, None, (NARROWS_ACCESS,), None, None),
)
REQUESTS = (
    RequestImpact("reviews answer", "golden", {"service": "reviews"}, Outcome({"v1": 100}, None, True), Outcome({"v1": 100}, None, True)),
    RequestImpact(
        "jason | reads",
        "file",
        {"service": "reviews"},
        Outcome({"v1": 90, "v2": 10}, None, True),
        Outcome(None, None, False, {"status": 403, "reason": "denied"}),
        ("destination", "authorization", "response"),
    ),
    RequestImpact("gone", "file", {"service": "gone"}, Outcome({"v1": 100}, None, True), Outcome(error="no service 'gone'"), ("destination", "authorization", "response")),
)
REPORT = DiffReport(BASE, HEAD, CHANGES, REQUESTS, GoldenChanges(changed=("reviews answer",)))


def test_the_tally_counts_changes_per_risk_most_serious_first() -> None:
    assert tally(REPORT) == (
        "6 changes in behaviour: 2 widen access, 1 relaxes mTLS, 1 removes protection, 1 narrows access, "
        "1 shifts 40% of traffic"
    )
    assert tally(DiffReport(BASE, HEAD, ())) == "no change in behaviour"
    assert tally(DiffReport(BASE, HEAD, CHANGES[4:5])) == "1 change in behaviour, none with a risk label"


def test_the_text_layout(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("w", encoding="utf-8") as stream:
        render_text(make_console(stream, color=False), REPORT, shown=lambda f: f"policies/{f}")
    assert out.read_text(encoding="utf-8") == (
        "starmesh diff\n"
        "base  origin/main (3f2a9c1e4b7d)  sha256:aaaaaaaaaaaa\n"
        "head  working tree  sha256:bbbbbbbbbbbb\n"
        "\n"
        "mesh\n"
        "  mesh: mtls strict → permissive  [widens access]  [relaxes mTLS]  policies/mesh.star:1\n"
        "ratings\n"
        "  reviews → ratings GET /ratings/* now allowed  [widens access]  policies/lib/access.star:9\n"
        "reviews\n"
        "  reviews: v1 90% → 50%, v2 10% → 50%  [shifts 40% of traffic]  policies/lib/routing.star:12\n"
        "  reviews rules[1]: timeout 1s → none  [removes protection]  policies/lib/routing.star:14\n"
        "  reviews rules[1]: sets `x|y` header <b>  policies/lib/a|b.star:20\n"
        "  details → reviews GET * now denied  [narrows access]\n"
        "\n"
        "6 changes in behaviour: 2 widen access, 1 relaxes mTLS, 1 removes protection, 1 narrows access, 1 shifts 40% of traffic\n"
        "\n"
        "golden requests (request_test), checks only:\n"
        '  changed: "reviews answer"\n'
        "\n"
        "requests: 3 tried, 2 changed\n"
        "REQUEST         FROM    BEFORE          AFTER              CHANGED\n"
        "jason | reads   file    v1 90%, v2 10%  403 denied         destination, authorization, response\n"
        "gone            file    v1 100%         no service 'gone'  destination, authorization, response\n"
        "reviews answer  golden  v1 100%         v1 100%            -\n"
    )


def test_the_markdown_layout_escapes_what_markdown_would_act_on() -> None:
    markdown = render_markdown(REPORT, shown=lambda f: f"policies/{f}")
    assert markdown == (
        "### starmesh diff: origin/main (3f2a9c1e4b7d) → working tree\n"
        "\n"
        "**6 changes in behaviour: 2 widen access, 1 relaxes mTLS, 1 removes protection, 1 narrows access, "
        "1 shifts 40% of traffic**\n"
        "\n"
        "| Service | Change | Risk | Policy |\n"
        "|---|---|---|---|\n"
        "| *mesh* | mesh: mtls strict → permissive | **widens access**, **relaxes mTLS** | `policies/mesh.star:1` |\n"
        "| ratings | reviews → ratings GET /ratings/\\* now allowed | **widens access** | `policies/lib/access.star:9` |\n"
        "| reviews | reviews: v1 90% → 50%, v2 10% → 50% | **shifts 40% of traffic** | `policies/lib/routing.star:12` |\n"
        "| reviews | reviews rules\\[1\\]: timeout 1s → none | **removes protection** | `policies/lib/routing.star:14` |\n"
        "| reviews | reviews rules\\[1\\]: sets \\`x\\|y\\` header \\<b\\> | — | `policies/lib/a\\|b.star:20` |\n"
        "| reviews | details → reviews GET \\* now denied | **narrows access** | — |\n"
        "\n"
        "**Golden requests** (`request_test`, checks only):\n"
        "\n"
        "- changed: `reviews answer`\n"
        "\n"
        "**Requests: 3 tried, 2 changed**\n"
        "\n"
        "| Request | From | Before | After | Changed |\n"
        "|---|---|---|---|---|\n"
        "| jason \\| reads | file | v1 90%, v2 10% | 403 denied | **destination**, **authorization**, **response** |\n"
        "| gone | file | v1 100% | no service 'gone' | **destination**, **authorization**, **response** |\n"
        "| reviews answer | golden | v1 100% | v1 100% | — |\n"
        "\n"
        "<sub>base sha256:aaaaaaaaaaaa · head sha256:bbbbbbbbbbbb</sub>\n"
    )


def test_markdown_folds_requests_when_none_changed_and_names_no_change() -> None:
    quiet = DiffReport(BASE, HEAD, (), REQUESTS[:1])
    markdown = render_markdown(quiet)
    assert "No change in behaviour." in markdown and "| Service |" not in markdown
    assert "<details>\n<summary>Requests: 1 tried, 0 changed</summary>\n" in markdown and "</details>" in markdown
    code_with_backticks = DiffReport(BASE, HEAD, (Change("s", "route.added", "x", file="a`b.star", line=1),))
    assert "| ``a`b.star:1`` |" in render_markdown(code_with_backticks)


def test_a_request_refused_at_its_destination_says_where_it_was_routed() -> None:
    denied = Outcome({"v1": 80, "v2": 0, "v3": 20}, None, False, {"status": 403, "reason": "denied"})
    assert describe_outcome(denied) == "403 denied at v1 80%, v3 20%"
    assert describe_outcome(Outcome(None, None, True, {"status": 404, "reason": "no-route"})) == "404 no-route"
    assert describe_outcome(Outcome({"v1": 100}, None, True, {"status": 503, "reason": "fault"})) == "503 fault"
    assert describe_outcome(Outcome({"v1": 100}, None, False)) == "v1 100% (audit: would be denied)"


def test_help_names_every_option_and_shows_examples(runner: CliRunner) -> None:
    result = runner.invoke(main, ["diff", "--help"])
    assert result.exit_code == 0
    for option in ("--repo", "--against", "--ca-cert", "--entry", "--format", "--exit-code", "--requests"):
        assert option in result.stdout
    assert "text|json|markdown" in result.stdout and "starmesh diff origin/main HEAD" in result.stdout
