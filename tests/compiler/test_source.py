"""Reading policy trees: directories, Git commits, the shipped library."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from starmesh.compiler.errors import SourceError
from starmesh.compiler.source import PolicySource, library_files, read_commit, read_directory


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_SYSTEM": os.devnull,
    }
    done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip()


# -- directories -----------------------------------------------------------------------


def test_reads_star_files_recursively_with_posix_keys(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "mesh.star": "mesh(name = 'demo')\n",
            "lib/routes.star": "R = 1\n",
            "lib/deep/more.star": "M = 'é'\n",
            "README.md": "not policy",
            ".git/hooks/x.star": "hidden",
            "lib/.cache/y.star": "hidden",
        },
    )
    source = read_directory(tmp_path)
    assert isinstance(source, PolicySource)
    assert list(source.files) == ["lib/deep/more.star", "lib/routes.star", "mesh.star"]
    assert source.files["lib/deep/more.star"] == "M = 'é'\n"
    assert source.entry == "mesh.star" and source.commit is None
    assert source.library == library_files()


def test_entry_may_be_elsewhere_but_must_exist_inside(tmp_path: Path) -> None:
    write(tmp_path, {"policy/main.star": "", "mesh.star": ""})
    assert read_directory(tmp_path, entry="./policy/main.star").entry == "policy/main.star"
    with pytest.raises(SourceError, match="no entry file other.star"):
        read_directory(tmp_path, entry="other.star")
    for bad in ("../mesh.star", "/etc/mesh.star", "lib/../../x.star", ""):
        with pytest.raises(SourceError, match="entry"):
            read_directory(tmp_path, entry=bad)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read_directory(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(SourceError, match="not a directory"):
        read_directory(tmp_path / "file")


def test_symlinks_inside_the_root_are_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, {"mesh.star": "", "real/a.star": "A = 1\n"})
    (root / "alias.star").symlink_to("real/a.star")
    (root / "linked").symlink_to("real", target_is_directory=True)
    (root / "loop").symlink_to(".", target_is_directory=True)
    source = read_directory(root)
    assert source.files["alias.star"] == "A = 1\n"
    assert source.files["linked/a.star"] == "A = 1\n"
    assert "real/a.star" in source.files


def test_symlink_escaping_the_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, {"mesh.star": ""})
    write(tmp_path, {"secret.star": "SECRET = 'x'\n"})
    (root / "lib.star").symlink_to(tmp_path / "secret.star")
    with pytest.raises(SourceError, match="lib.star is a symlink that points outside the policy root") as caught:
        read_directory(root)
    assert "SECRET" not in str(caught.value)


def test_directory_symlink_escaping_the_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, {"mesh.star": ""})
    write(tmp_path, {"outside/x.star": ""})
    (root / "lib").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(SourceError, match="lib is a symlink that points outside"):
        read_directory(root)


def test_caps_and_encoding(tmp_path: Path) -> None:
    write(tmp_path, {"mesh.star": "", "a.star": "x" * 100, "b.star": ""})
    with pytest.raises(SourceError, match="more than 2 .star files"):
        read_directory(tmp_path, max_files=2)
    with pytest.raises(SourceError, match="more than 50 bytes"):
        read_directory(tmp_path, max_bytes=50)
    (tmp_path / "c.star").write_bytes(b"\xff\xfe")
    with pytest.raises(SourceError, match="c.star is not UTF-8"):
        read_directory(tmp_path)


# -- Git commits -----------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    return repo


def test_reads_a_commit_not_the_work_tree(repo: Path) -> None:
    write(repo, {"mesh.star": "V = 1\n", "lib/a.star": "A = 1\n", "notes.txt": "x"})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    first = git(repo, "rev-parse", "HEAD")
    write(repo, {"mesh.star": "V = 2\n"})
    git(repo, "commit", "-q", "-am", "two")
    write(repo, {"mesh.star": "V = 3 (uncommitted)\n", "lib/new.star": "untracked"})

    head = read_commit(repo)
    assert head.files == {"lib/a.star": "A = 1\n", "mesh.star": "V = 2\n"}
    assert head.commit == git(repo, "rev-parse", "HEAD") and len(head.commit) == 40
    assert head.library == library_files()
    old = read_commit(repo, first[:10])
    assert old.files["mesh.star"] == "V = 1\n" and old.commit == first


def test_subdirectory_and_entry(repo: Path) -> None:
    write(repo, {"policies/mesh.star": "", "policies/lib/x.star": "", "other/y.star": "", ".github/z.star": ""})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    source = read_commit(repo, subdir="policies")
    assert sorted(source.files) == ["lib/x.star", "mesh.star"]
    assert read_commit(repo, subdir="policies", entry="lib/x.star").entry == "lib/x.star"
    assert ".github/z.star" not in read_commit(repo, entry="policies/mesh.star").files
    with pytest.raises(SourceError, match="no directory nope"):
        read_commit(repo, subdir="nope")
    with pytest.raises(SourceError, match="no entry file mesh.star"):
        read_commit(repo, subdir="other")
    with pytest.raises(SourceError, match="subdirectory"):
        read_commit(repo, subdir="../x")


def test_symlink_blobs_resolve_only_inside_the_root(repo: Path) -> None:
    write(repo, {"policies/mesh.star": "", "policies/real.star": "R = 1\n", "secret.star": "S = 1\n"})
    (repo / "policies" / "alias.star").symlink_to("real.star")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    source = read_commit(repo, subdir="policies")
    assert source.files["alias.star"] == "R = 1\n"

    (repo / "policies" / "escape.star").symlink_to("../secret.star")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "two")
    with pytest.raises(SourceError, match="escape.star is a symlink that points outside the policy root"):
        read_commit(repo, subdir="policies")
    assert read_commit(repo, entry="policies/mesh.star").files["policies/escape.star"] == "S = 1\n"  # inside the repo root


def test_bad_repository_and_revision(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(SourceError, match="not a Git repository"):
        read_commit(tmp_path / "nothing-here")
    write(repo, {"mesh.star": ""})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    with pytest.raises(SourceError, match="unknown revision 'no-such-branch'"):
        read_commit(repo, "no-such-branch")


# -- the shipped library -----------------------------------------------------------------


def test_library_files_are_keyed_by_label() -> None:
    files = library_files()
    assert all(key.startswith("@starmesh//") and key.endswith(".star") for key in files)
    assert list(files) == sorted(files)
    policies = Path(__file__).resolve().parents[2] / "policies"
    expected = sorted(p.name for p in policies.glob("*.star"))
    assert [key.removeprefix("@starmesh//") for key in files] == expected
