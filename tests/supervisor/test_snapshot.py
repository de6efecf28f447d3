"""Git state of a guarded repo, on real repositories: a working tree no index trick can hide."""

from __future__ import annotations

import os

import pytest

from fleet.errors import GuardError
from fleet.supervisor.snapshot import GuardedRepo, parse_raw
from tests.supervisor.conftest import git


def test_a_clean_tree_has_no_stash_and_a_dirty_one_keeps_index_and_untracked(repo):
    state = GuardedRepo(repo.resolve())
    head = state.head()
    tree, stash = state.stash(head)
    assert stash is None and tree == state.tree_of(head)
    (repo / "README.md").write_text("staged\n")
    git(repo, "add", "README.md")
    (repo / "notes.txt").write_text("untracked\n")
    tree, stash = state.stash(head)
    assert git(repo, "rev-parse", f"{stash}^1") == head
    assert git(repo, "show", f"{stash}^2:README.md") == "staged"  # parent 2 = the index
    assert git(repo, "show", f"{stash}:notes.txt") == "untracked"
    assert git(repo, "rev-parse", "refs/fleet-supervisor/snapshot") == stash


def test_assume_unchanged_hides_nothing_from_the_worktree_tree(repo):
    state = GuardedRepo(repo.resolve())
    head = state.head()
    git(repo, "update-index", "--assume-unchanged", "ci/protected.cfg")
    (repo / "ci" / "protected.cfg").write_text("off\n")
    changes = state.diff(state.tree_of(head), state.worktree_tree(head))
    assert [(c.status, c.new_path) for c in changes] == [("M", "ci/protected.cfg")]


def test_unreadable_files_and_directories_are_hashed_and_locked_again(repo):
    state = GuardedRepo(repo.resolve())
    head = state.head()
    perms = state.perms(state.listed_files())
    assert perms["ci"] == 0o755 and perms["ci/protected.cfg"] == 0o644
    os.chmod(repo / "ci" / "protected.cfg", 0)
    os.chmod(repo / "ci", 0)
    try:
        assert state.worktree_tree(head, perms) == state.tree_of(head)
        assert os.stat(repo / "ci").st_mode & 0o777 == 0
    finally:
        os.chmod(repo / "ci", 0o755)
    assert os.stat(repo / "ci" / "protected.cfg").st_mode & 0o777 == 0


def test_a_damaged_index_is_reported_and_rebuilt(repo):
    state = GuardedRepo(repo.resolve())
    (repo / ".git" / "index").write_bytes(b"garbage")
    found: dict[str, list[str]] = {}
    state.repair_index(state.head(), found)
    assert list(found) == [".git/index"] and found[".git/index"][0].startswith("damaged: ")
    assert git(repo, "status", "--porcelain") == ""


def test_a_subdirectory_is_refused(repo):
    with pytest.raises(GuardError, match="guard the repository root instead"):
        GuardedRepo((repo / "ci").resolve())


def test_raw_diff_parsing_names_renames_modes_and_symlinks():
    raw = (
        b":100644 100644 a b R087\0old.cfg\0new.cfg\0:100644 120000 a c T\0x\0"
        b":100644 100755 a d M\0run.sh\0:000000 120000 0 e A\0link\0"
    )
    kinds = [c.kinds() for c in parse_raw(raw)]
    assert kinds == [
        {"old.cfg": "renamed to new.cfg, modified", "new.cfg": "renamed from old.cfg, modified"},
        {"x": "replaced by symlink"},
        {"run.sh": "mode changed 100644 -> 100755"},
        {"link": "added as symlink"},
    ]
