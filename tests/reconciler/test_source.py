"""RepoSource against real Git repositories in tmp_path.

    local repo (work tree / bare) ── read in place
    file:// URL ── mirrored into state_dir/mirror.git, fetched on each read
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from starmesh.reconciler.errors import SourceUnavailable
from starmesh.reconciler.source import RepoSource, check_branch, is_remote


# -- names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "remote"),
    [
        ("file:///srv/policy.git", True),
        ("https://git.example/policy.git", True),
        ("ssh://git@git.example/policy.git", True),
        ("git@git.example:team/policy.git", True),
        ("/srv/policy", False),
        ("policy", False),
        ("./team:policy", False),
    ],
)
def test_urls_are_remote_and_paths_local(repo: str, remote: bool) -> None:
    assert is_remote(repo) is remote


def test_an_existing_path_with_a_colon_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "team:policy").mkdir()
    assert not is_remote("team:policy")


@pytest.mark.parametrize("branch", ["main", "release/v2", "feature-1.2"])
def test_valid_branch_names(branch: str) -> None:
    assert check_branch(branch) == branch


@pytest.mark.parametrize("branch", ["", "-x", "a..b", "a b", "x.lock", "refs/heads/main", "a~1", "a:b", "x/"])
def test_invalid_branch_names_say_so(branch: str) -> None:
    with pytest.raises(ValueError, match="not a valid branch name"):
        check_branch(branch)


# -- RepoSource -----------------------------------------------------------------------


def test_local_work_tree_tip_and_git_dir(tmp_path: Path, h: Any) -> None:
    repo = h.make_repo(tmp_path / "policy")
    first = h.commit(repo, {"a.txt": "1"})
    source = RepoSource(str(repo), "main", tmp_path / "state")
    assert not source.remote
    assert source.tip() == first
    assert source.repo_path() == repo
    assert source.git_dir() == (repo / ".git").resolve()
    second = h.commit(repo, {"a.txt": "2"})
    assert source.tip() == second
    assert not (tmp_path / "state").exists(), "a local repo needs no mirror"


def test_local_bare_repo_and_other_branches(tmp_path: Path, h: Any) -> None:
    work = h.make_repo(tmp_path / "work")
    main_sha = h.commit(work, {"a.txt": "1"})
    release_sha = h.commit(work, {"b.txt": "2"}, branch="release/v2")
    bare = tmp_path / "policy.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    assert RepoSource(str(bare), "main", tmp_path / "state").tip() == main_sha
    source = RepoSource(str(bare), "release/v2", tmp_path / "state")
    assert source.tip() == release_sha
    assert source.git_dir() == bare.resolve()


def test_missing_branch_and_missing_repo_are_unavailable(tmp_path: Path, h: Any) -> None:
    repo = h.make_repo(tmp_path / "policy")
    with pytest.raises(SourceUnavailable, match="no branch 'main'"):
        RepoSource(str(repo), "main", tmp_path / "state").tip()  # nothing committed yet
    h.commit(repo, {"a.txt": "1"})
    with pytest.raises(SourceUnavailable, match="no branch 'prod'.*--branch"):
        RepoSource(str(repo), "prod", tmp_path / "state").tip()
    with pytest.raises(SourceUnavailable, match="is not a Git repository"):
        RepoSource(str(tmp_path / "nowhere"), "main", tmp_path / "state").tip()


def test_a_url_is_mirrored_into_the_state_dir_and_fetched_on_each_read(tmp_path: Path, h: Any) -> None:
    origin = h.make_repo(tmp_path / "origin")
    first = h.commit(origin, {"a.txt": "1"})
    state = tmp_path / "state"
    source = RepoSource(origin.as_uri(), "main", state)
    assert source.remote
    assert source.tip() == first
    assert source.repo_path() == state / "mirror.git"
    assert h.git(state / "mirror.git", "rev-parse", "--is-bare-repository") == "true"
    second = h.commit(origin, {"a.txt": "2"})
    assert source.read_tip() == first, "read_tip does not fetch"
    assert source.tip() == second
    # A restarted control plane reuses the mirror (and fetch --prune drops deleted branches).
    h.commit(origin, {"b.txt": "x"}, branch="gone")
    again = RepoSource(origin.as_uri(), "gone", state)
    assert again.tip() == h.git(origin, "rev-parse", "gone")
    h.git(origin, "checkout", "-q", "main")
    h.git(origin, "branch", "-q", "-D", "gone")
    with pytest.raises(SourceUnavailable, match="no branch 'gone'"):
        again.tip()


def test_a_changed_url_is_followed(tmp_path: Path, h: Any) -> None:
    old = h.make_repo(tmp_path / "old")
    h.commit(old, {"a.txt": "old"})
    new = h.make_repo(tmp_path / "new")
    new_tip = h.commit(new, {"a.txt": "new"})
    RepoSource(old.as_uri(), "main", tmp_path / "state").tip()
    assert RepoSource(new.as_uri(), "main", tmp_path / "state").tip() == new_tip


def test_an_unreachable_url_says_what_failed(tmp_path: Path) -> None:
    source = RepoSource((tmp_path / "missing.git").as_uri(), "main", tmp_path / "state")
    with pytest.raises(SourceUnavailable, match="git clone.*failed: .*does not appear to be a git repository"):
        source.tip()
    assert not (tmp_path / "state" / "mirror.git").exists(), "a failed clone leaves no mirror"


def test_a_fetch_is_refused_once_closed(tmp_path: Path, h: Any) -> None:
    origin = h.make_repo(tmp_path / "origin")
    h.commit(origin, {"a.txt": "1"})
    source = RepoSource(origin.as_uri(), "main", tmp_path / "state")
    source.close()
    with pytest.raises(SourceUnavailable, match="stopping"):
        source.tip()
