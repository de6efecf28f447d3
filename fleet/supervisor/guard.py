"""ChangeGuard: snapshot a repo before an agent edits it, then keep the change or undo it exactly.

What is compared (snapshot vs. what the agent left): the whole working tree as a git tree
(tracked + untracked non-ignored files, built in a private index so assume-unchanged or
skip-worktree bits in the real index hide nothing), HEAD's tree when the agent committed,
renames, deletions, type and mode changes, permission bits git does not track (chmod 000),
symlinks (to protected paths or outside the repo), protected files git ignores, HEAD's
branch and ancestry, and the git internals `config`, `hooks/`, `info/`,
`objects/info/alternates`, `refs/replace/` (byte for byte; restored before any other git command
runs). Our git calls ignore replace refs (GIT_NO_REPLACE_OBJECTS), so none can forge the diff.

What "exactly" means for a rollback (documented limits):
- `git reset --hard <head>` + `git clean -ffd` (untracked files and directories, nested
  repositories included; files git ignored at snapshot time are kept even if .gitignore
  changed since, protected ones restored from a copy), then the snapshot's uncommitted work
  and index are re-applied and permissions restored; the result is verified (HEAD and
  working-tree tree equal the snapshot's).
- The snapshot's commits (HEAD and the uncommitted work) are also pushed to a bare
  repository beside the kept patches (`<patches>/.snapshots/`): an agent that deletes the
  snapshot ref and prunes the objects cannot take the operator's uncommitted work with it.
  The newest `keep_commits` snapshots are kept there; older ones are pruned.
- Empty directories are not tracked by git and are not restored.
- The user's global git config is trusted; the agent is only prevented from changing the
  repository's own config and hooks. Our git calls never run hooks or fsmonitor.

The parts live by concern: paths.py (protected globs), violations.py (what touches them),
snapshot.py (git state), internals.py (copies of what git cannot restore), archive.py
(patches, bare-repo copies), check.py; this module decides and restores.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleet.clock import Clock, SystemClock
from fleet.errors import GuardError
from fleet.settings import get_settings
from fleet.supervisor import internals
from fleet.supervisor.archive import KEEP_COMMITS, SnapshotArchive, save_patch
from fleet.supervisor.check import run_check
from fleet.supervisor.gitcli import IDENTITY, git, out, z_paths
from fleet.supervisor.internals import Found
from fleet.supervisor.paths import ALWAYS_PROTECTED, ProtectedPaths
from fleet.supervisor.snapshot import SNAPSHOT_REF, Final, GuardedRepo, Snapshot
from fleet.supervisor.violations import protected_changes

ACCEPT_MESSAGE = "supervisor: accepted change"


@dataclass(frozen=True)
class GuardVerdict:
    accepted: bool
    reason: str
    violations: list[str]
    patch_path: Path | None
    head: str


@dataclass
class _Examined:
    """One look at the repo after the agent (or the check): what it left and what it broke."""

    final: Final | None  # None when the repository could not be read (`damage` says why)
    found: Found = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # text diffs of git internals, for the patch
    damage: str | None = None


class ChangeGuard:
    """Guards one repository: `snap = guard.snapshot()`, the agent works, `guard.validate(snap)`."""

    def __init__(
        self,
        repo: Path,
        protected: Sequence[str] = (),
        check_command: Sequence[str] | None = None,
        patches_dir: Path | None = None,
        check_timeout: float = 600,
        clock: Clock | None = None,
        keep_commits: int = KEEP_COMMITS,
    ):
        self.repo = Path(repo).resolve()
        self.protected = ProtectedPaths(list(protected))
        self.check_command = list(check_command) if check_command else None
        self.patches_dir = (
            Path(patches_dir)
            if patches_dir
            else get_settings().home.resolve() / "supervisor" / "patches"
        )
        self.check_timeout = check_timeout
        self.clock = clock or SystemClock()
        # Kept patches inside the repo (a relative state dir) are the guard's files, never the
        # agent's change.
        patches = self.patches_dir.resolve()
        self._patches_in_repo = (
            patches.relative_to(self.repo).as_posix()
            if patches != self.repo and patches.is_relative_to(self.repo)
            else None
        )
        self.git = GuardedRepo(self.repo, self._patches_in_repo)
        self.archive = SnapshotArchive(self.repo, self.patches_dir, keep_commits)

    # ------------------------------------------------------------ the three verbs

    def snapshot(self) -> Snapshot:
        """Record HEAD, the uncommitted work as a commit object, permissions and git internals."""
        self.git.drop_stale_lock()
        head = self.git.head()
        if head is None:
            raise GuardError(f"{self.repo} has no commit yet; commit once before supervising it")
        branch = self.git.branch()
        tree, stash = self.git.stash(head)
        archive_ref = self.archive.store(head, stash)
        ignored_paths = self.git.ignored_files()
        return Snapshot(
            repo=self.repo,
            head=head,
            stash=stash,
            taken_at=self.clock.now(),
            tree=tree,
            branch=branch,
            perms=self.git.perms(self.git.listed_files()),
            internals=internals.read_internals(self.git.common_dir),
            ignored=self._read_ignored_protected(ignored_paths),
            ignored_paths=frozenset(ignored_paths),
            archive_ref=archive_ref,
        )

    def validate(self, snap: Snapshot) -> GuardVerdict:
        """Keep the agent's change (committed) or undo it; never raises for agent misbehaviour.

        Raises GuardError only when the repository cannot be restored (an operator must look).
        """
        first = self._examine(snap)
        refused = self._refusal(snap, first, None, first.notes)
        if refused:
            return refused
        assert first.final is not None  # a damaged repository was refused above
        if not first.final.changes and first.final.head == snap.head:
            return GuardVerdict(True, "accepted (no changes)", [], None, snap.head)
        if self.check_command:
            failure = run_check(self.check_command, self.repo, self.check_timeout)
            if failure:
                return self._reject(snap, first.final, f"checks failed: {failure}", [], first.notes)
            # The check ran the agent's code; it must not have touched protected paths either.
            after = self._examine(snap)
            refused = self._refusal(snap, after, first.final, first.notes + after.notes, "checks")
            if refused:
                return refused
        return GuardVerdict(True, "accepted", [], None, self._commit(first.final))

    def rollback(self, snap: Snapshot, reason: str, violations: Sequence[str] = ()) -> Path | None:
        """Keep the difference from `snap` as a patch, restore `snap` exactly; returns the patch."""
        final = self._examine(snap, judge=False).final
        return self._reject(snap, final, reason, list(violations), []).patch_path

    def current_head(self) -> str | None:
        return self.git.head()

    # ------------------------------------------------------------ inspection

    def _examine(self, snap: Snapshot, judge: bool = True) -> _Examined:
        """Undo what makes git untrustworthy (internals, a stale lock, a damaged index), then
        compare the repository with `snap`; with `judge`, every change to a protected path is
        in `found`."""
        seen = _Examined(final=None)
        now = internals.read_internals(self.git.common_dir)
        seen.notes = internals.internals_changes(snap.internals, now, seen.found)
        # Restore git internals before running any other git command: they may now hold hooks.
        self._restore_internals(snap)
        self.git.drop_stale_lock()
        self.git.repair_index(snap.head, seen.found)
        try:
            internals.ignored_changes(snap.ignored, self._read_ignored_protected(), seen.found)
            seen.final = self.git.inspect(snap)
        except GuardError as exc:
            seen.damage = str(exc)
            return seen
        if judge:
            protected_changes(self.repo, self.protected, snap, seen.final, seen.found)
        return seen

    def _read_ignored_protected(
        self, ignored_files: Sequence[str] | None = None
    ) -> dict[str, internals.Entry]:
        listed = self.git.ignored_files() if ignored_files is None else ignored_files
        return internals.read_files(
            self.repo, (rel for rel in listed if self.protected.matches(rel))
        )

    # ------------------------------------------------------------ decisions

    def _refusal(
        self, snap: Snapshot, seen: _Examined, before: Final | None, notes: list[str], by: str = ""
    ) -> GuardVerdict | None:
        """The verdict when a look at the repo (after the agent, or `by` the checks) finds it
        damaged or a protected path changed; None when it finds neither."""
        if seen.final is None:
            damaged = f"repository damaged{f' by {by}' if by else ''}: {seen.damage}"
            return self._reject(snap, before, damaged, ["repository (damaged)"], notes)
        found = _format_violations(seen.found)
        if not found:
            return None
        changed = f"protected path changed{f' during {by}' if by else ''}: {_join(found)}"
        return self._reject(snap, seen.final, changed, found, notes)

    def _reject(
        self,
        snap: Snapshot,
        final: Final | None,
        reason: str,
        violations: list[str],
        notes: list[str],
    ) -> GuardVerdict:
        """Keep what the agent did as a patch, then put the repository back to `snap`."""
        patch = save_patch(
            self.patches_dir, self.repo, snap, final, reason, violations, notes, self.clock.now()
        )
        self._restore(snap)
        return GuardVerdict(False, reason, violations, patch, snap.head)

    def _commit(self, final: Final) -> str:
        head = final.head
        assert head is not None
        if final.tree != self.git.tree_of(head):
            head = out(
                self.repo, *IDENTITY, "commit-tree", final.tree, "-p", head, "-m", ACCEPT_MESSAGE
            )
        # Commit exactly the validated tree; anything the check rewrote in tracked files goes.
        git(self.repo, "reset", "-q", "--hard", head)
        return head

    def _restore_internals(self, snap: Snapshot) -> None:
        """Write back the git internals, then bring back the snapshot's objects if the agent
        destroyed them (deleted refs, expired reflogs, `git gc --prune=now`)."""
        internals.restore_internals(self.git.common_dir, snap.internals)
        lost = [
            sha
            for sha in (snap.head, snap.stash)
            if sha and git(self.repo, "cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode
        ]
        if lost:
            self.archive.recover(snap)
            if snap.stash:
                git(self.repo, "update-ref", SNAPSHOT_REF, snap.stash)

    def _restore(self, snap: Snapshot) -> None:
        """Put the repository back to `snap`: HEAD, branch, working tree, index, permissions."""
        self._restore_internals(snap)
        self.git.drop_stale_lock()
        if snap.branch:
            git(self.repo, "symbolic-ref", "HEAD", snap.branch)
        else:
            git(self.repo, "update-ref", "--no-deref", "HEAD", snap.head)
        self.git.unlock_dirs(snap.perms)
        # Files are written back through the attributes in the working tree: drop the agent's
        # first (the snapshot's own come back with the files, ignored ones from their copy).
        attributes = git(
            self.repo, "ls-files", "-z", "--cached", "--others", "--", ":(glob)**/.gitattributes"
        ).stdout
        for rel in z_paths(attributes):
            (self.repo / rel).unlink(missing_ok=True)
        git(self.repo, "reset", "-q", "--hard", snap.head)
        git(self.repo, "clean", "-ffdq", *self._kept_from_clean(snap))
        if snap.stash:
            git(self.repo, "read-tree", "--reset", "-u", f"{snap.stash}^{{tree}}")
            git(self.repo, "read-tree", f"{snap.stash}^2^{{tree}}")
            git(self.repo, "update-index", "-q", "--refresh", check=False)
        internals.restore_files(self.repo, snap.ignored, self._read_ignored_protected())
        for rel, perm in snap.perms.items():
            try:
                st = os.lstat(self.repo / rel)
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != perm:
                os.chmod(self.repo / rel, perm)
        head, tree = self.git.head(), self.git.worktree_tree(snap.tree)
        if head != snap.head or tree != snap.tree:
            raise GuardError(
                f"rollback of {self.repo} did not restore the snapshot (HEAD {head}, tree {tree}; "
                f"expected {snap.head}, {snap.tree}); "
                f"restore by hand with `git reset --hard {snap.head}`"
                + (f" and `git stash apply {snap.stash}`" if snap.stash else "")
            )

    def _kept_from_clean(self, snap: Snapshot) -> list[str]:
        """`-e` patterns for `git clean`: the patches dir, and files git ignored at snapshot time
        but no longer ignores (an edited .gitignore, HEAD's .gitignore without the operator's
        uncommitted lines)."""
        patches = (
            ["-e", _literal_pattern(self._patches_in_repo + "/")] if self._patches_in_repo else []
        )
        kept = sorted(rel for rel in snap.ignored_paths if os.path.lexists(self.repo / rel))
        if not kept:
            return patches
        probe = git(
            self.repo,
            "check-ignore",
            "-z",
            "--stdin",
            "--no-index",
            check=False,
            stdin=b"\0".join(os.fsencode(rel) for rel in kept),
        )
        still = set(z_paths(probe.stdout)) if probe.returncode in (0, 1) else set()
        return patches + [
            arg for rel in kept if rel not in still for arg in ("-e", _literal_pattern(rel))
        ]


def _literal_pattern(rel: str) -> str:
    """A gitignore pattern matching exactly the path `rel` from the repo root."""
    escaped = re.sub(r"([\\*?\[])", r"\\\1", rel)
    body = escaped.rstrip(" ")  # trailing spaces count only when escaped
    return "/" + body + "\\ " * (len(escaped) - len(body))


def _format_violations(found: Mapping[str, list[str]]) -> list[str]:
    return [f"{path} ({'; '.join(dict.fromkeys(kinds))})" for path, kinds in found.items()]


def _join(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


__all__ = [
    "ACCEPT_MESSAGE",
    "ALWAYS_PROTECTED",
    "ChangeGuard",
    "GuardVerdict",
    "ProtectedPaths",
    "Snapshot",
]
