"""Copies of what git cannot restore: git internals and ignored protected files, on tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

from fleet.supervisor.internals import (
    Entry,
    change_kind,
    ignored_changes,
    internals_changes,
    read_files,
    read_internals,
    restore_files,
    restore_internals,
)


def make_git_dir(root: Path) -> Path:
    (root / "hooks").mkdir(parents=True)
    (root / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")
    (root / "config").write_text("[core]\n\tbare = false\n")
    (root / "objects" / "info").mkdir(parents=True)
    (root / "refs").mkdir()
    return root


def test_change_kind_names_what_happened():
    a = Entry("file", 0o644, b"x")
    assert change_kind(None, a) == "added" and change_kind(a, None) == "deleted"
    assert change_kind(a, Entry("file", 0o644, b"y")) == "modified"
    assert change_kind(a, Entry("link", 0o777, b"x")) == "modified"
    assert change_kind(a, Entry("file", 0o600, b"x")) == "permissions 0644 -> 0600"


def test_internals_are_read_compared_and_restored_byte_for_byte(tmp_path):
    git_dir = make_git_dir(tmp_path / "git")
    saved = read_internals(git_dir)
    assert {"config", "hooks", "hooks/pre-commit.sample"} <= set(saved)
    (git_dir / "hooks" / "pre-commit").write_text("#!/bin/sh\nexit 0\n")
    (git_dir / "config").write_text("[core]\n\thooksPath = evil\n")
    (git_dir / "refs" / "replace").mkdir()
    (git_dir / "refs" / "replace" / "abc").write_text("def\n")
    os.symlink("/elsewhere", git_dir / "objects" / "info" / "alternates")
    found: dict[str, list[str]] = {}
    notes = internals_changes(saved, read_internals(git_dir), found)
    assert found == {
        ".git/config": ["modified"],
        ".git/hooks/pre-commit": ["added"],
        ".git/objects/info/alternates": ["added"],
        ".git/refs/replace": ["added"],
        ".git/refs/replace/abc": ["added"],
    }
    assert "+\thooksPath = evil" in notes
    restore_internals(git_dir, saved)
    assert read_internals(git_dir) == saved
    assert not (git_dir / "refs" / "replace").exists()


def test_ignored_protected_files_are_copied_and_put_back(tmp_path):
    (tmp_path / "supervisor.yaml").write_text("processes: []\n")
    os.chmod(tmp_path / "supervisor.yaml", 0o600)
    saved = read_files(tmp_path, ["supervisor.yaml", "missing.env"])
    assert set(saved) == {"supervisor.yaml"}
    (tmp_path / "supervisor.yaml").unlink()
    os.symlink("/etc/passwd", tmp_path / "supervisor.yaml")
    (tmp_path / ".env").write_text("added\n")
    now = read_files(tmp_path, ["supervisor.yaml", ".env"])
    found: dict[str, list[str]] = {}
    ignored_changes(saved, now, found)
    assert found == {
        ".env": ["added, ignored by git"],
        "supervisor.yaml": ["modified, ignored by git"],
    }
    restore_files(tmp_path, saved, now)
    assert read_files(tmp_path, ["supervisor.yaml", ".env"]) == saved
