"""What counts as touching a protected path, judged on real repos without the guard around it."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from fleet.supervisor.paths import ProtectedPaths
from fleet.supervisor.snapshot import GuardedRepo, Snapshot
from fleet.supervisor.violations import protected_changes
from tests.supervisor.conftest import git

PROTECTED = ProtectedPaths(["ci/**"])


def judge(repo, snap: Snapshot) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    protected_changes(repo, PROTECTED, snap, GuardedRepo(repo).inspect(snap), found)
    return found


def take(repo) -> Snapshot:
    state = GuardedRepo(repo)
    head = state.head()
    tree, stash = state.stash(head)
    when = datetime(2026, 1, 1, tzinfo=UTC)
    perms = state.perms(state.listed_files())
    return Snapshot(repo, head, stash, when, tree, state.branch(), perms)


def test_an_unprotected_edit_is_not_a_violation(repo):
    repo = repo.resolve()
    snap = take(repo)
    (repo / "app.py").write_text("print(2)\n")
    assert judge(repo, snap) == {}


def test_symlinks_to_protected_paths_and_out_of_the_repo(repo):
    repo = repo.resolve()
    snap = take(repo)
    os.symlink("ci", repo / "to-ci")
    os.symlink("../../elsewhere", repo / "out")
    os.symlink("README.md", repo / "fine")
    assert judge(repo, snap) == {
        "to-ci": ["symlink to protected path ci"],
        "out": ["symlink pointing outside the repo: -> ../../elsewhere"],
    }


def test_rewritten_history_and_a_detached_head(repo):
    repo = repo.resolve()
    (repo / "app.py").write_text("print(2)\n")
    git(repo, "commit", "-q", "-am", "second")
    snap = take(repo)
    git(repo, "checkout", "-q", "--detach", "HEAD~1")
    found = judge(repo, snap)
    assert found["HEAD"][0].startswith("history rewritten: ")
    assert found["HEAD"][1] == "switched from refs/heads/main to detached"


def test_a_permission_change_git_cannot_see(repo):
    repo = repo.resolve()
    snap = take(repo)
    os.chmod(repo / "ci" / "protected.cfg", 0o600)
    os.chmod(repo / "README.md", 0o600)  # not protected: its bits are the agent's to change
    assert judge(repo, snap) == {"ci/protected.cfg": ["permissions 0644 -> 0600"]}
