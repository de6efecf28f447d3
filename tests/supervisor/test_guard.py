"""ChangeGuard on real git repos: protected paths hold, broken changes are undone exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.clock import ManualClock
from fleet.supervisor.guard import ACCEPT_MESSAGE, ChangeGuard, ProtectedPaths
from tests.supervisor.conftest import agent, escapee, fingerprint, git, gone

PROTECT = ["ci/**", "*.lock"]
PASS = [sys.executable, "-c", "pass"]


def make_guard(repo: Path, tmp_path: Path, check=None, protect=PROTECT) -> ChangeGuard:
    return ChangeGuard(
        repo,
        protected=protect,
        check_command=check,
        patches_dir=tmp_path / "patches",
        clock=ManualClock(),
    )


def dirty(repo: Path) -> None:
    """Pre-existing uncommitted work the rollback must bring back: staged, unstaged, untracked."""
    (repo / "README.md").write_text("# app\nstaged line\n")
    git(repo, "add", "README.md")
    (repo / "README.md").write_text("# app\nstaged line\nunstaged line\n")
    (repo / "notes.txt").write_text("untracked work\n")
    (repo / "debug.log").write_text("ignored file\n")


def assert_rejected_and_restored(verdict, before: dict, repo: Path, *needles: str) -> None:
    assert not verdict.accepted
    assert verdict.reason.startswith("protected path changed: "), verdict.reason
    for needle in needles:
        assert any(needle in v for v in verdict.violations), (needle, verdict.violations)
    assert verdict.head == before["head"]
    assert verdict.patch_path is not None and verdict.patch_path.stat().st_size > 0
    assert fingerprint(repo) == before


# ---------------------------------------------------------------- protected paths


def test_direct_edit_of_protected_file_is_rejected_and_undone(repo, tmp_path):
    guard = make_guard(repo, tmp_path, check=PASS)
    dirty(repo)
    before = fingerprint(repo)
    snap = guard.snapshot()
    assert snap.stash is not None
    agent(
        repo,
        "open('ci/protected.cfg','w').write('checks = off\\n');"
        " open('app.py','a').write('# ok\\n')",
    )
    verdict = guard.validate(snap)
    assert verdict.reason == "protected path changed: ci/protected.cfg (modified)"
    assert_rejected_and_restored(verdict, before, repo, "ci/protected.cfg (modified)")
    patch = verdict.patch_path.read_text()
    assert "diff --git a/ci/protected.cfg b/ci/protected.cfg" in patch and "+checks = off" in patch
    assert verdict.patch_path.name.startswith("20260101T000000Z-" + before["head"][:8])
    git(
        repo, "apply", "--check", "--binary", str(verdict.patch_path)
    )  # a human can re-apply it as is


def test_renames_out_of_and_into_protected_paths_are_rejected(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    agent(
        repo,
        "import os; os.rename('ci/protected.cfg', 'moved.cfg');"
        " os.rename('README.md', 'ci/README.md')",
    )
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict,
        before,
        repo,
        "ci/protected.cfg (renamed to moved.cfg)",
        "ci/README.md (renamed from README.md)",
    )


def test_deleting_a_protected_lock_file_is_rejected(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "deps.lock").unlink()
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "deps.lock (deleted)")


def test_protected_file_replaced_by_symlink(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    agent(
        repo,
        "import os; os.remove('ci/protected.cfg'); os.symlink('/dev/null', 'ci/protected.cfg')",
    )
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "ci/protected.cfg (replaced by symlink")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("ci/protected.cfg", "symlink to protected path ci/protected.cfg"),
        ("/etc/passwd", "symlink pointing outside the repo"),
        ("../../outside", "symlink pointing outside the repo"),
    ],
)
def test_new_symlink_to_protected_or_outside_is_rejected(repo, tmp_path, target, expected):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    os.symlink(target, repo / "shortcut")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, f"shortcut ({expected}")


def test_chmod_000_on_protected_file_is_rejected_and_permissions_restored(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    os.chmod(repo / "ci" / "protected.cfg", 0o000)
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict, before, repo, "ci/protected.cfg (made unreadable, permissions 0644 -> 0000)"
    )
    assert "permissions 0644 -> 0000" in verdict.patch_path.read_text()


def test_new_commit_touching_protected_path_is_rejected(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    dirty(repo)
    before = fingerprint(repo)
    snap = guard.snapshot()
    agent(repo, "open('ci/protected.cfg','w').write('checks = off\\n')")
    git(repo, "commit", "-q", "-m", "relax checks", "--", "ci/protected.cfg")
    assert git(repo, "rev-parse", "HEAD") != before["head"]
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "ci/protected.cfg (modified)")
    assert "relax checks" in verdict.patch_path.read_text()


def test_committed_then_reverted_in_worktree_still_counts(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "ci" / "protected.cfg").write_text("checks = off\n")
    git(repo, "commit", "-q", "-am", "sneaky")
    (repo / "ci" / "protected.cfg").write_text("checks = strict\n")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "ci/protected.cfg (modified)")


def test_git_hook_and_config_changes_are_rejected_and_removed(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    agent(
        repo,
        "import os\n"
        "open('.git/hooks/pre-commit','w').write('#!/bin/sh\\nexit 0\\n');"
        " os.chmod('.git/hooks/pre-commit', 0o755)\n"
        "open('.git/config','a').write('[core]\\n\\thooksPath = evil\\n')\n"
        "open('app.py','a').write('# harmless\\n')",
    )
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict, before, repo, ".git/hooks/pre-commit (added)", ".git/config (modified)"
    )
    text = verdict.patch_path.read_text()
    assert "# +\thooksPath = evil" in text and "diff --git a/app.py b/app.py" in text


def test_supervisor_config_is_always_protected(repo, tmp_path):
    (repo / "supervisor.yaml").write_text("processes: []\n")
    git(repo, "add", "supervisor.yaml")
    git(repo, "commit", "-q", "-m", "supervisor config")
    guard = make_guard(repo, tmp_path, protect=[])
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "supervisor.yaml").write_text("processes: []\n# relaxed\n")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "supervisor.yaml (modified)")


def test_paths_with_spaces_and_newlines(repo, tmp_path):
    weird = repo / "odd dir"
    weird.mkdir()
    (weird / "a\nb.txt").write_text("one\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "weird names")
    guard = make_guard(repo, tmp_path, protect=["odd dir/**"])
    before = fingerprint(repo)
    snap = guard.snapshot()
    (weird / "a\nb.txt").write_text("two\n")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "odd dir/a\nb.txt (modified)")


# ---------------------------------------------------------------- checks


def test_allowed_change_that_passes_checks_is_accepted_and_committed(repo, tmp_path):
    check = [sys.executable, "-c", "import app_lib; assert app_lib.VALUE == 2"]
    guard = make_guard(repo, tmp_path, check=check)
    dirty(repo)
    snap = guard.snapshot()
    agent(
        repo, "open('app_lib.py','w').write('VALUE = 2\\n'); open('app.py','a').write('# tuned\\n')"
    )
    verdict = guard.validate(snap)
    assert verdict.accepted and verdict.reason == "accepted" and verdict.patch_path is None
    assert verdict.head == git(repo, "rev-parse", "HEAD") != snap.head
    assert (
        git(repo, "log", "-1", "--format=%s|%an|%ae")
        == f"{ACCEPT_MESSAGE}|fleet-supervisor|supervisor@fleet.local"
    )
    assert (
        git(repo, "status", "--porcelain") == ""
    )  # next snapshot starts clean (ignored debug.log stays)
    assert (repo / "debug.log").exists()
    assert "app_lib.py" in git(repo, "show", "--name-only", "--format=", "HEAD")


def test_allowed_change_that_fails_checks_is_rolled_back(repo, tmp_path):
    check = [
        sys.executable,
        "-c",
        "import sys, app_lib; sys.exit(0 if app_lib.VALUE == 2 else 'VALUE is wrong')",
    ]
    guard = make_guard(repo, tmp_path, check=check)
    dirty(repo)
    before = fingerprint(repo)
    snap = guard.snapshot()
    agent(repo, "open('app_lib.py','w').write('VALUE = 3\\n')")
    verdict = guard.validate(snap)
    assert not verdict.accepted and verdict.violations == []
    assert verdict.reason == "checks failed: exit 1: VALUE is wrong"
    assert fingerprint(repo) == before and verdict.head == before["head"]
    assert "+VALUE = 3" in verdict.patch_path.read_text()


def test_check_that_hangs_is_stopped_at_the_timeout(repo, tmp_path):
    hang = [sys.executable, "-c", "import time; print('stuck', flush=True); time.sleep(30)"]
    guard = ChangeGuard(
        repo, protected=PROTECT, check_command=hang, patches_dir=tmp_path, check_timeout=0.3
    )
    snap = guard.snapshot()
    (repo / "app.py").write_text("changed\n")
    verdict = guard.validate(snap)
    # The tail is what the check printed before it was stopped ("stuck", unless it was slower to
    # start).
    assert verdict.reason.startswith("checks failed: timed out after 0.3 s: ")
    assert (repo / "app.py").read_text().startswith("import time")


def test_check_that_edits_a_protected_file_is_rejected(repo, tmp_path):
    evil = [sys.executable, "-c", "open('ci/protected.cfg','w').write('off\\n')"]
    guard = make_guard(repo, tmp_path, check=evil)
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "app.py").write_text("changed\n")
    verdict = guard.validate(snap)
    assert verdict.reason == "protected path changed during checks: ci/protected.cfg (modified)"
    assert fingerprint(repo) == before


def test_no_change_is_accepted_without_a_commit(repo, tmp_path):
    guard = make_guard(repo, tmp_path, check=[sys.executable, "-c", "raise SystemExit(1)"])
    snap = guard.snapshot()
    verdict = guard.validate(snap)
    assert (
        verdict.accepted and verdict.head == snap.head and verdict.reason == "accepted (no changes)"
    )


def test_not_a_repository_is_a_clear_error(tmp_path):
    from fleet.errors import GuardError

    with pytest.raises(GuardError, match="not a git repository"):
        ChangeGuard(tmp_path)


# ---------------------------------------------------------------- globs


@pytest.mark.parametrize(
    ("path", "protected"),
    [
        ("ci", True),
        ("ci/protected.cfg", True),
        ("ci/deep/x", True),
        ("cix/a", False),
        ("deps.lock", True),
        ("sub/yarn.lock", True),
        ("lock", False),
        ("supervisor.yaml", True),
        (".git/hooks/x", True),
        ("src/app.py", False),
        ("backend/supervisor", True),
        ("backend/supervisor/main.go", True),
        ("backend/other.go", False),
    ],
)
def test_protected_globs(path, protected):
    assert ProtectedPaths(["ci/**", "*.lock", "backend/supervisor/"]).matches(path) is protected


def test_unreadable_protected_directory_is_rejected(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    os.chmod(repo / "ci", 0o000)
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict, before, repo, "ci (made unreadable, permissions 0755 -> 0000)"
    )


def test_ignored_protected_file_is_guarded_too(repo, tmp_path):
    # A local supervisor config that git ignores: git cannot restore it, the guard keeps a copy.
    (repo / ".gitignore").write_text("*.log\nsupervisor.yaml\n")
    git(repo, "commit", "-q", "-am", "ignore the local supervisor config")
    (repo / "supervisor.yaml").write_text("processes: []\n")
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "supervisor.yaml").write_text("processes: []\napp: {repo: ., command: [evil]}\n")
    agent(
        repo,
        "open('.gitignore','a').write('ci/new.cfg\\n'); open('ci/new.cfg','w').write('hidden')",
    )
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict,
        before,
        repo,
        "supervisor.yaml (modified, ignored by git)",
        "ci/new.cfg (added, ignored by git)",
    )


def test_branch_switch_and_damaged_index_are_undone(repo, tmp_path):
    guard = make_guard(repo, tmp_path, check=PASS)
    dirty(repo)
    before = fingerprint(repo)
    snap = guard.snapshot()
    git(repo, "checkout", "-q", "-b", "evil")
    (repo / "app.py").write_text("print('other branch')\n")
    git(repo, "commit", "-q", "-am", "on another branch")
    (repo / ".git" / "index").write_bytes(b"garbage")
    (repo / ".git" / "index.lock").write_bytes(b"")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict, before, repo, "HEAD (switched from refs/heads/main to refs/heads/evil)"
    )


def test_executable_bit_on_protected_file_is_a_mode_change(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    os.chmod(repo / "deps.lock", 0o755)
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict, before, repo, "deps.lock (mode changed 100644 -> 100755; permissions 0644 -> 0755)"
    )
    assert "new mode 100755" in verdict.patch_path.read_text()


# ---------------------------------------------------------------- git tricks


def test_replace_ref_forging_the_snapshot_tree_does_not_hide_an_edit(repo, tmp_path):
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    # The agent edits a protected file, then maps the snapshot's tree to the edited tree.
    (repo / "ci" / "protected.cfg").write_text("checks = off\n")
    index = {**os.environ, "GIT_INDEX_FILE": str(tmp_path / "agent-index")}
    for args in (["read-tree", "HEAD"], ["add", "-A"]):
        subprocess.run(["git", *args], cwd=repo, env=index, check=True)
    edited = subprocess.run(
        ["git", "write-tree"], cwd=repo, env=index, check=True, capture_output=True, text=True
    ).stdout.strip()
    git(repo, "replace", "-f", git(repo, "rev-parse", "HEAD^{tree}"), edited)
    verdict = guard.validate(snap)
    assert_rejected_and_restored(
        verdict, before, repo, "ci/protected.cfg (modified)", ".git/refs/replace (added)"
    )
    assert git(repo, "replace", "--list") == ""


def test_gitattributes_that_change_how_git_reads_files_are_rejected(repo, tmp_path):
    # Decoded as UTF-7 the edited file equals the original, so git alone would see no change.
    guard = make_guard(repo, tmp_path, protect=["ci/**"])
    (repo / "ci" / "check.py").write_text("# guard config\nenforce_limits()\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "check script")
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / ".gitattributes").write_text("ci/check.py working-tree-encoding=UTF-7\n")
    (repo / "ci" / "check.py").write_bytes(b"# guard config+AAo-enforce_limits()\n")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, ".gitattributes (added)")


def test_gitattributes_at_any_depth_are_always_protected():
    paths = ProtectedPaths([])
    assert paths.matches(".gitattributes") and paths.matches("src/deep/.gitattributes")
    assert not paths.matches("src/gitattributes.md")


@pytest.mark.parametrize(
    ("glob", "path", "protected"),
    [
        (".github", ".github/workflows/ci.yml", True),
        ("ci", "ci/gate.sh", True),
        ("ci/", "ci/sub/gate.sh", True),
        ("ci/*", "ci/sub/gate.sh", True),
        ("ci/*.sh", "ci/sub/gate.sh", False),
        ("ci", "cix/gate.sh", False),
        ("docs/ci", "ci/gate.sh", False),
    ],
)
def test_a_glob_naming_a_directory_protects_everything_below_it(glob, path, protected):
    assert ProtectedPaths([glob]).matches(path) is protected


def test_bare_directory_name_guards_the_files_below_it(repo, tmp_path):
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "workflow")
    guard = make_guard(repo, tmp_path, protect=[".github"])
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / ".github" / "workflows" / "ci.yml").write_text("on: push\njobs: {pwn: {}}\n")
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, ".github/workflows/ci.yml (modified)")


# ---------------------------------------------------------------- what a rollback keeps


def test_rollback_keeps_files_ignored_by_an_uncommitted_gitignore(repo, tmp_path):
    # The operator ignores .env and data/ in an edit of .gitignore not yet committed.
    (repo / ".gitignore").write_text("*.log\n.env\ndata/\n")
    (repo / ".env").write_text("API_KEY=secret\n")
    (repo / "data").mkdir()
    (repo / "data" / "big.db").write_text("precious\n")
    guard = make_guard(repo, tmp_path, check=[sys.executable, "-c", "raise SystemExit(1)"])
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "app.py").write_text("print(2)\n")
    verdict = guard.validate(snap)
    assert not verdict.accepted and verdict.reason.startswith("checks failed")
    assert fingerprint(repo) == before


def test_rollback_keeps_ignored_files_the_agent_unignored(repo, tmp_path):
    (repo / "sub").mkdir()
    (repo / "sub" / "secret.log").write_text("operator's\n")
    (repo / "sub" / "we*rd [1].log").write_text("glob characters in the name\n")
    guard = make_guard(repo, tmp_path)
    before = fingerprint(repo)
    snap = guard.snapshot()
    # A nested .gitignore re-includes the file, so a plain `git clean` would delete it.
    agent(
        repo,
        "open('sub/.gitignore','w').write('!*.log\\n');"
        " open('ci/protected.cfg','w').write('off\\n')",
    )
    verdict = guard.validate(snap)
    assert_rejected_and_restored(verdict, before, repo, "ci/protected.cfg (modified)")


def test_patch_kept_inside_the_repo_survives_the_rollback(repo, tmp_path):
    # `fleet supervise guard` run from the repo keeps its state in ./.fleet by default.
    guard = ChangeGuard(
        repo, protected=PROTECT, patches_dir=repo / ".fleet" / "patches", clock=ManualClock()
    )
    before = fingerprint(repo)
    snap = guard.snapshot()
    (repo / "deps.lock").write_text("pinned==2.0\n")
    verdict = guard.validate(snap)
    assert not verdict.accepted and verdict.patch_path.parent == repo / ".fleet" / "patches"
    assert "+pinned==2.0" in verdict.patch_path.read_text()
    snap = guard.snapshot()
    assert snap.stash is None  # the kept patch is the guard's own file, not uncommitted work
    (repo / "app.py").write_text("print('again')\n")
    second = guard.rollback(
        snap, "broke the app"
    )  # writes a patch after the snapshot, then verifies
    assert verdict.patch_path.exists() and second.exists()
    assert (repo / "app.py").read_text() == before["files"]["app.py"][2].decode()


def test_process_that_left_the_checks_session_is_stopped(repo, tmp_path):
    pidfile = tmp_path / "escapee.pid"
    guard = make_guard(repo, tmp_path, check=escapee(pidfile))
    snap = guard.snapshot()
    (repo / "app.py").write_text("changed\n")
    assert guard.validate(snap).accepted
    assert gone(pidfile)


def test_operator_work_survives_an_agent_that_deletes_the_snapshot_and_prunes(repo, tmp_path):
    """The snapshot's objects are kept outside the repo too: refs and objects there are the
    agent's to break."""
    (repo / "app.py").write_text("print('operator work in progress')\n")
    (repo / "notes.txt").write_text("operator's untracked notes\n")
    before = fingerprint(repo)
    guard = make_guard(repo, tmp_path)
    snap = guard.snapshot()
    assert snap.stash is not None
    agent(
        repo,
        "import subprocess\n"
        "run = lambda *a: subprocess.run(['git', *a], check=True, capture_output=True)\n"
        "run('update-ref', '-d', 'refs/fleet-supervisor/snapshot')\n"
        "open('app.py', 'w').write('print(1)\\n')\n"
        "open('ci/protected.cfg', 'w').write('off\\n')\n"
        "run('reflog', 'expire', '--expire=now', '--all')\n"
        "run('gc', '-q', '--prune=now')\n",
    )
    assert (
        subprocess.run(["git", "cat-file", "-e", snap.stash], cwd=repo).returncode != 0
    )  # really gone
    verdict = guard.validate(snap)
    assert not verdict.accepted and "ci/protected.cfg" in verdict.reason
    assert fingerprint(repo) == before  # the operator's uncommitted and untracked work is back
