"""The snapshot archive (the guard's own bare repo) keeps the newest keep_commits snapshots."""

from __future__ import annotations

import subprocess

import pytest

from fleet.clock import ManualClock
from fleet.errors import GuardError
from fleet.supervisor.archive import SNAPSHOT_REFS, SnapshotArchive
from fleet.supervisor.guard import ChangeGuard
from tests.supervisor.conftest import fingerprint, git


def has_object(repo, sha: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", sha], cwd=repo).returncode == 0


def test_snapshots_beyond_keep_commits_are_pruned_from_the_archive(repo, tmp_path):
    guard = ChangeGuard(
        repo, ["ci/**"], patches_dir=tmp_path / "patches", clock=ManualClock(), keep_commits=3
    )
    snaps = []
    for i in range(5):
        (repo / "notes.txt").write_text(f"work in progress {i}\n")
        snaps.append(guard.snapshot())
    archive = guard.archive.path
    expected = [f"{SNAPSHOT_REFS}{n:010d}-{s.stash[:12]}" for n, s in enumerate(snaps, 1) if n > 2]
    assert guard.archive.refs() == expected
    assert [s.archive_ref for s in snaps[2:]] == guard.archive.refs()
    assert not has_object(archive, snaps[0].stash) and not has_object(archive, snaps[1].stash)
    assert all(has_object(archive, s.stash) for s in snaps[2:])
    assert has_object(archive, snaps[0].head)  # HEAD is still kept by the newer snapshots


def test_a_kept_snapshot_comes_back_after_a_repo_prune_and_a_pruned_one_is_a_clear_error(
    repo, tmp_path
):
    guard = ChangeGuard(
        repo, ["ci/**"], patches_dir=tmp_path / "patches", clock=ManualClock(), keep_commits=1
    )
    (repo / "notes.txt").write_text("old work\n")
    old = guard.snapshot()
    (repo / "notes.txt").write_text("newer work\n")
    before = fingerprint(repo)
    new = guard.snapshot()

    def destroy() -> None:
        git(repo, "update-ref", "-d", "refs/fleet-supervisor/snapshot")
        git(repo, "reflog", "expire", "--expire=now", "--all")
        git(repo, "gc", "-q", "--prune=now")

    destroy()
    assert not has_object(repo, new.stash)
    guard.rollback(new, "test")
    assert fingerprint(repo) == before
    destroy()
    with pytest.raises(GuardError, match="no longer in the archive \\(it keeps the newest 1\\)"):
        guard.rollback(old, "test")


def test_legacy_sha_refs_are_pruned_with_the_old_snapshots(repo, tmp_path):
    guard = ChangeGuard(repo, patches_dir=tmp_path / "patches", clock=ManualClock(), keep_commits=2)
    guard.snapshot()
    head = git(repo, "rev-parse", "HEAD")
    git(guard.archive.path, "update-ref", f"refs/fleet-supervisor/{head}", head)
    assert guard.archive.prune() == [f"refs/fleet-supervisor/{head}"]
    assert git(guard.archive.path, "for-each-ref", "--format=%(refname)") == guard.archive.refs()[0]


def test_keep_commits_must_be_positive(repo, tmp_path):
    with pytest.raises(GuardError, match="keep_commits must be at least 1"):
        SnapshotArchive(repo, tmp_path, keep_commits=0)
