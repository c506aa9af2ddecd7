"""How the semantic diff writes values: match descriptions, shares, settings, JSON."""

from __future__ import annotations

from starmesh.bundle.spec import Fault, Match, Mirror, OutlierDetection, Retries, Rollout, Rule, StringMatch
from starmesh.preview.semantic_text import (
    describe_matches,
    duration_text,
    fault_text,
    mirror_text,
    policy_json,
    settings_change_text,
    share_changes_text,
    shares_text,
)


def test_describe_matches() -> None:
    assert describe_matches(()) == "all requests"
    assert describe_matches((Match(),)) == "all requests"
    one = Match(
        path_prefix="/api/",
        methods=("GET", "HEAD"),
        headers={"x-v": StringMatch(kind="regex", value="^v[0-9]$"), "end-user": StringMatch(kind="exact", value="jo")},
        query={"debug": StringMatch(kind="present")},
    )
    assert describe_matches((one, Match(path_exact="/x"), Match(path_regex="/a.*"))) == (
        'prefix /api/, methods GET/HEAD, header end-user = "jo", header x-v ~ "^v[0-9]$", query debug present'
        ' or path /x or path ~ "/a.*"'
    )


def test_shares() -> None:
    assert shares_text({"v1": 90, "v2": 0, "v3": 10}) == "v1 90%, v3 10%"
    shifted = share_changes_text({"v1": 90, "v3": 10}, {"v3": 50, "v1": 50}, ["v1", "v3"])
    assert shifted == "v1 90% → 50%, v3 10% → 50%"
    assert share_changes_text({"v1": 100}, {"v2": 100}, ["v2"]) == "v2 0% → 100%, v1 100% → 0%"


def test_durations_and_settings() -> None:
    durations = [duration_text(ms) for ms in (None, 0, 250, 2000, 60_000, 1500)]
    assert durations == ["none", "0s", "250ms", "2s", "1m", "1500ms"]
    assert fault_text(Fault(delay_ms=200, delay_percent=50)) == "delay 200ms for 50%"
    assert fault_text(None) == "none"
    assert mirror_text(Mirror(version="v2", percent=12.5)) == "v2 12.5%"
    old, new = policy_json(OutlierDetection()), policy_json(OutlierDetection(interval_ms=1000, max_ejection_percent=20))
    assert settings_change_text(old, new) == "interval 10s → 1s, max_ejection_percent 50% → 20%"
    assert settings_change_text(None, {"attempts": 1}) == "none → attempts 1"


def test_policy_json_uses_the_policy_words() -> None:
    assert policy_json(Retries(per_try_timeout_ms=300)) == {
        "attempts": 2,
        "per_try_timeout": "300ms",
        "on": ["5xx", "connect-failure", "reset"],
        "budget_percent": 20,
    }
    assert policy_json(Rollout()) == {"canary_percent": 0, "bake": "0s", "max_failures": 0}
    # Only struct fields are renamed: a version or header named like a duration field stays.
    assert policy_json(Rule(backends={"canary_ms": 100}, set_request_headers={"x_ms": "1"})) == {
        "backends": {"canary_ms": 100},
        "set_request_headers": {"x_ms": "1"},
    }
    assert policy_json(None) is None
