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
- Empty directories are not tracked by git and are not restored.
- The user's global git config is trusted; the agent is only prevented from changing the
  repository's own config and hooks. Our git calls never run hooks or fsmonitor.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence


from fleet.clock import Clock, SystemClock
from fleet.errors import GuardError
from fleet.settings import get_settings
from fleet.procs import kill_group, kill_marked, marked_env
from fleet.supervisor.gitcli import IDENTITY, git, out, z_paths

# The supervisor's own configuration can never be changed by the agent it supervises, nor can
# .gitattributes (at any depth): its filters and encodings change the bytes git sees.
ALWAYS_PROTECTED: tuple[str, ...] = ("supervisor.yaml", "supervisor.yml", ".fleet-supervisor/**", ".gitattributes")
ACCEPT_MESSAGE = "supervisor: accepted change"
SNAPSHOT_REF = "refs/fleet-supervisor/snapshot"
# Snapshot commits in the guard's own bare repository, outside the agent's reach: <prefix>/<sha>.
BACKUP_REFS = "refs/fleet-supervisor"
SYMLINK_MODE = "120000"
# Git internals an agent could use to run code or hide files (relative to the common git dir);
# replace refs would show the operator's own git a forged tree.
GUARDED_INTERNALS = ("config", "hooks", "info", "objects/info/alternates", "objects/info/http-alternates",
                     "refs/replace")
_TAIL_CHARS = 240


# ---------------------------------------------------------------- protected globs


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """gitignore-like globs: `**` spans directories, `*`/`?` stay in one segment.

    A pattern without "/" matches a name at any depth ("*.lock"); one with "/" is anchored at
    the repo root; "dir/" and "dir/**" cover the directory itself and everything below it
    (and so does any pattern that matches a directory: see ProtectedPaths.matches).
    """
    pat = pattern.strip().replace("\\", "/")
    if pat.startswith("./"):
        pat = pat[2:]
    anchored = "/" in pat.rstrip("/")
    pat = pat.lstrip("/")
    if pat.endswith("/"):
        pat += "**"
    out_: list[str] = []
    i = 0
    while i < len(pat):
        if pat.startswith("/**", i) and i + 3 == len(pat):
            out_.append("(?:/.*)?")  # "dir/**" also protects "dir" itself
            i += 3
        elif pat.startswith("**/", i):
            out_.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out_.append(".*")
            i += 2
        elif pat[i] == "*":
            out_.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out_.append("[^/]")
            i += 1
        elif pat[i] == "[":
            end = pat.find("]", i + 1)
            if end == -1:
                out_.append(re.escape("["))
                i += 1
            else:
                body = pat[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out_.append(f"[{body}]")
                i = end + 1
        else:
            out_.append(re.escape(pat[i]))
            i += 1
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(prefix + "".join(out_) + r"\Z", re.DOTALL)


class ProtectedPaths:
    """The configured globs plus the always-protected ones; `matches("ci/x.cfg")`.

    As in .gitignore, a path is protected when it or any directory above it matches a glob:
    "ci", "ci/" and "ci/*" all protect "ci/sub/gate.sh".
    """

    def __init__(self, globs: Sequence[str]):
        self.globs = tuple(dict.fromkeys([*ALWAYS_PROTECTED, *(g for g in globs if g.strip())]))
        self._regexes = [_glob_regex(g) for g in self.globs]

    def matches(self, path: str) -> bool:
        path = path.strip("/")
        if path == ".git" or path.startswith(".git/"):
            return True
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(r.match(p) for p in prefixes for r in self._regexes)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class _Internal:
    kind: str  # "file" | "dir" | "link"
    perm: int
    data: bytes = b""


def _change_kind(before: _Internal | None, after: _Internal | None, *, added: str = "added",
                 deleted: str = "deleted", modified: str = "modified") -> str:
    """How a file the repo's history does not track changed between two readings."""
    if before is None:
        return added
    if after is None:
        return deleted
    if before.kind != after.kind or before.data != after.data:
        return modified
    return f"permissions {before.perm:04o} -> {after.perm:04o}"


@dataclass(frozen=True)
class Snapshot:
    """HEAD plus a commit object of the uncommitted work (None when the tree was clean)."""

    repo: Path
    head: str
    stash: str | None
    taken_at: datetime
    tree: str = ""  # tree of the whole working tree (tracked + untracked, not ignored)
    branch: str | None = None  # symbolic ref HEAD pointed at; None = detached
    perms: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)
    internals: Mapping[str, _Internal] = field(default_factory=dict, repr=False, compare=False)
    # Protected files git ignores (a local supervisor.yaml, .env): git cannot restore them, so we keep a copy.
    ignored: Mapping[str, _Internal] = field(default_factory=dict, repr=False, compare=False)
    # Every file git ignored: a rollback never deletes one, even if .gitignore no longer ignores it.
    ignored_paths: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)


@dataclass(frozen=True)
class GuardVerdict:
    accepted: bool
    reason: str
    violations: list[str]
    patch_path: Path | None
    head: str


@dataclass(frozen=True)
class _Change:
    status: str  # git's letter: A D M T R C
    old_path: str
    new_path: str
    old_mode: str
    new_mode: str
    new_sha: str
    score: int = 100

    def kinds(self) -> dict[str, str]:
        """Path → the kind of change, in operator words (a rename names both paths)."""
        s = self.status
        if s == "A":
            return {self.new_path: "added as symlink" if self.new_mode == SYMLINK_MODE else "added"}
        if s == "D":
            return {self.old_path: "deleted"}
        if s == "T":
            if self.new_mode == SYMLINK_MODE:
                return {self.new_path: "replaced by symlink"}
            if self.old_mode == SYMLINK_MODE:
                return {self.new_path: "symlink replaced by a file"}
            return {self.new_path: f"type changed {self.old_mode} -> {self.new_mode}"}
        if s == "R":
            edited = "" if self.score >= 100 else ", modified"
            return {self.old_path: f"renamed to {self.new_path}{edited}",
                    self.new_path: f"renamed from {self.old_path}{edited}"}
        if s == "C":
            return {self.new_path: f"copied from {self.old_path}"}
        if self.old_mode != self.new_mode:
            return {self.new_path: f"mode changed {self.old_mode} -> {self.new_mode}"}
        return {self.new_path: "modified"}


@dataclass
class _Final:
    """What the agent left behind."""

    head: str | None
    branch: str | None
    tree: str
    changes: list[_Change]


# ---------------------------------------------------------------- the guard


class ChangeGuard:
    """Guards one repository: `snap = guard.snapshot()`, let the agent work, `guard.validate(snap)`."""

    def __init__(
        self,
        repo: Path,
        protected: Sequence[str] = (),
        check_command: Sequence[str] | None = None,
        patches_dir: Path | None = None,
        check_timeout: float = 600,
        clock: Clock | None = None,
    ):
        self.repo = Path(repo).resolve()
        self.protected = ProtectedPaths(list(protected))
        self.check_command = list(check_command) if check_command else None
        self.patches_dir = Path(patches_dir) if patches_dir else get_settings().home.resolve() / "supervisor" / "patches"
        self.check_timeout = check_timeout
        self.clock = clock or SystemClock()
        # Kept patches inside the repo (a relative state dir) are the guard's files, never the agent's change.
        patches = self.patches_dir.resolve()
        self._patches_in_repo = (patches.relative_to(self.repo).as_posix()
                                 if patches != self.repo and patches.is_relative_to(self.repo) else None)
        try:
            top = out(self.repo, "rev-parse", "--show-toplevel")
        except GuardError as exc:
            raise GuardError(f"{self.repo} is not a git repository; run `git init` and commit once ({exc})") from exc
        if Path(top).resolve() != self.repo:
            raise GuardError(f"{self.repo} is inside the repository {top}; guard the repository root instead")
        self.git_dir = Path(out(self.repo, "rev-parse", "--absolute-git-dir"))
        common = Path(out(self.repo, "rev-parse", "--git-common-dir"))
        self.common_dir = common if common.is_absolute() else (self.repo / common).resolve()

    # ------------------------------------------------------------ snapshot

    def snapshot(self) -> Snapshot:
        """Record HEAD, the uncommitted work as a commit object, permissions and git internals."""
        self._drop_stale_lock()
        head = self._head()
        if head is None:
            raise GuardError(f"{self.repo} has no commit yet; commit once before supervising it")
        branch = self._branch()
        head_tree = out(self.repo, "rev-parse", f"{head}^{{tree}}")
        index_tree = git(self.repo, "write-tree", check=False)
        if index_tree.returncode != 0:
            raise GuardError(f"the index of {self.repo} has unresolved conflicts; resolve them before supervising")
        index_tree_sha = index_tree.stdout.decode().strip()
        tree = self._worktree_tree(head)
        stash = None
        if tree != head_tree or index_tree_sha != head_tree:
            # Like `git stash create`, but the untracked files are in the tree too:
            # parent 1 = HEAD, parent 2 = the index as a commit.
            msg = "fleet-supervisor snapshot"
            index_commit = out(self.repo, *IDENTITY, "commit-tree", index_tree_sha, "-p", head, "-m", f"{msg} (index)")
            stash = out(self.repo, *IDENTITY, "commit-tree", tree, "-p", head, "-p", index_commit, "-m", msg)
            # A ref keeps the object alive if anything runs `git gc` meanwhile.
            git(self.repo, "update-ref", "-m", msg, SNAPSHOT_REF, stash)
        self._keep_outside(head, stash)
        perms = self._perms(self._listed_files())
        ignored_paths = self._ignored_files()
        return Snapshot(
            repo=self.repo, head=head, stash=stash, taken_at=self.clock.now(), tree=tree, branch=branch,
            perms=perms, internals=self._read_internals(), ignored=self._read_ignored_protected(ignored_paths),
            ignored_paths=frozenset(ignored_paths),
        )

    # ------------------------------------------------------------ validate

    def validate(self, snap: Snapshot) -> GuardVerdict:
        """Keep the agent's change (committed) or undo it; never raises for agent misbehaviour.

        Raises GuardError only when the repository cannot be restored (an operator must look).
        """
        violations: dict[str, list[str]] = {}
        internal_notes = self._internals_violations(snap, violations)
        # Restore git internals before running any other git command: they may now hold hooks.
        self._restore_internals(snap)
        self._drop_stale_lock()
        self._repair_index(snap, violations)
        try:
            self._ignored_violations(snap, violations)
        except GuardError as exc:
            return self._reject(snap, None, f"repository damaged: {exc}", ["repository (damaged)"], internal_notes)
        try:
            final = self._inspect(snap)
        except GuardError as exc:
            return self._reject(snap, None, f"repository damaged: {exc}", ["repository (damaged)"], internal_notes)
        self._path_violations(snap, final, violations)
        found = _format_violations(violations)
        if found:
            return self._reject(snap, final, f"protected path changed: {_join(found)}", found, internal_notes)
        if not final.changes and final.head == snap.head:
            return GuardVerdict(True, "accepted (no changes)", [], None, snap.head)
        if self.check_command:
            failure = self._run_check()
            if failure:
                return self._reject(snap, final, f"checks failed: {failure}", [], internal_notes)
            # The check ran the agent's code; it must not have touched protected paths either.
            after: dict[str, list[str]] = {}
            notes_after = self._internals_violations(snap, after)
            self._restore_internals(snap)
            self._drop_stale_lock()
            self._repair_index(snap, after)
            try:
                self._ignored_violations(snap, after)
                rechecked = self._inspect(snap)
            except GuardError as exc:
                return self._reject(snap, final, f"repository damaged by checks: {exc}", ["repository (damaged)"],
                                    internal_notes + notes_after)
            self._path_violations(snap, rechecked, after)
            found = _format_violations(after)
            if found:
                return self._reject(snap, rechecked, f"protected path changed during checks: {_join(found)}",
                                    found, internal_notes + notes_after)
        head = self._commit(final)
        return GuardVerdict(True, "accepted", [], None, head)

    # ------------------------------------------------------------ rollback

    def rollback(self, snap: Snapshot, reason: str, violations: Sequence[str] = ()) -> Path | None:
        """Save the difference from `snap` as a patch, then restore `snap` exactly; returns the patch."""
        self._restore_internals(snap)
        self._drop_stale_lock()
        self._repair_index(snap, {})
        try:
            final = self._inspect(snap)
        except GuardError:
            final = None
        patch = self._save_patch(snap, final, reason, list(violations), [])
        self._restore(snap)
        return patch

    def current_head(self) -> str | None:
        return self._head()

    # ------------------------------------------------------------ internals: inspection

    def _inspect(self, snap: Snapshot) -> _Final:
        head = self._head()
        branch = self._branch()
        tree = self._worktree_tree(snap.tree, snap)
        changes = self._diff(snap.tree, tree)
        if head is not None and head != snap.head:
            # A change committed and then undone in the working tree still counts.
            head_tree = out(self.repo, "rev-parse", f"{head}^{{tree}}")
            if head_tree != tree:
                changes += self._diff(snap.tree, head_tree)
        return _Final(head=head, branch=branch, tree=tree, changes=changes)

    def _path_violations(self, snap: Snapshot, final: _Final, found: dict[str, list[str]]) -> None:
        for change in final.changes:
            for path, kind in change.kinds().items():
                if self.protected.matches(path):
                    found.setdefault(path, []).append(kind)
            if change.new_mode == SYMLINK_MODE:
                self._symlink_violation(change, found)
        # Permission bits git does not track (chmod 000 keeps git's mode 100644).
        for path, perm in snap.perms.items():
            if not self.protected.matches(path):
                continue
            try:
                st = os.lstat(self.repo / path)
            except OSError:
                continue  # deletions come from the diff
            if stat.S_ISLNK(st.st_mode):
                continue
            now = stat.S_IMODE(st.st_mode)
            if now != perm:
                unreadable = "made unreadable, " if not now & stat.S_IRUSR else ""
                found.setdefault(path, []).append(f"{unreadable}permissions {perm:04o} -> {now:04o}")
        if final.head is None:
            found.setdefault("HEAD", []).append("no longer points at a commit")
        elif final.head != snap.head:
            ancestor = git(self.repo, "merge-base", "--is-ancestor", snap.head, final.head, check=False)
            if ancestor.returncode != 0:
                found.setdefault("HEAD", []).append(f"history rewritten: {final.head[:12]} does not descend from {snap.head[:12]}")
        if final.branch != snap.branch:
            found.setdefault("HEAD", []).append(f"switched from {snap.branch or 'detached'} to {final.branch or 'detached'}")

    def _symlink_violation(self, change: _Change, found: dict[str, list[str]]) -> None:
        path = change.new_path
        target = git(self.repo, "cat-file", "blob", change.new_sha).stdout.decode(errors="surrogateescape")
        lexical = target if os.path.isabs(target) else os.path.normpath(os.path.join(os.path.dirname(path), target))
        candidates = [lexical]
        real = os.path.realpath(self.repo / path)
        candidates.append(real)
        for cand in candidates:
            if os.path.isabs(cand):
                rel = os.path.relpath(cand, self.repo) if _inside(cand, self.repo) else None
            else:
                rel = cand if cand != ".." and not cand.startswith("../") else None
            if rel is None:
                found.setdefault(path, []).append(f"symlink pointing outside the repo: -> {target}")
                return
            if rel != "." and self.protected.matches(rel):
                found.setdefault(path, []).append(f"symlink to protected path {rel}")
                return

    def _internals_violations(self, snap: Snapshot, found: dict[str, list[str]]) -> list[str]:
        """Compare guarded git internals; returns text diffs for the patch header."""
        now = self._read_internals()
        notes: list[str] = []
        for rel in sorted(set(snap.internals) | set(now)):
            before, after = snap.internals.get(rel), now.get(rel)
            if before == after:
                continue
            shown = f".git/{rel}"
            kind = _change_kind(before, after)
            found.setdefault(shown, []).append(kind)
            if (before is None or before.kind == "file") and (after is None or after.kind == "file"):
                old = (before.data if before else b"").decode(errors="replace").splitlines()
                new = (after.data if after else b"").decode(errors="replace").splitlines()
                diff = difflib.unified_diff(old, new, f"a/{shown}", f"b/{shown}", lineterm="")
                notes.append(f"{shown} ({kind})")
                notes.extend(diff)
        return notes

    def _ignored_violations(self, snap: Snapshot, found: dict[str, list[str]]) -> None:
        now = self._read_ignored_protected()
        for rel in sorted(set(snap.ignored) | set(now)):
            before, after = snap.ignored.get(rel), now.get(rel)
            if before == after:
                continue
            kind = _change_kind(before, after, added="added, ignored by git",
                                deleted="deleted or no longer ignored", modified="modified, ignored by git")
            found.setdefault(rel, []).append(kind)

    def _ignored_files(self) -> list[str]:
        return z_paths(git(self.repo, "ls-files", "-z", "--others", "--ignored", "--exclude-standard").stdout)

    def _read_ignored_protected(self, ignored_files: Sequence[str] | None = None) -> dict[str, _Internal]:
        found: dict[str, _Internal] = {}
        for rel in self._ignored_files() if ignored_files is None else ignored_files:
            if self.protected.matches(rel):
                _read_entry(self.repo / rel, rel, found)
        return found

    def _restore_ignored(self, snap: Snapshot) -> None:
        now = self._read_ignored_protected()
        for rel in set(now) - set(snap.ignored):
            (self.repo / rel).unlink(missing_ok=True)
        for rel, want in snap.ignored.items():
            if now.get(rel) == want:
                continue
            p = self.repo / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                p.unlink()
            if want.kind == "link":
                os.symlink(want.data.decode(errors="surrogateescape"), p)
                continue
            p.write_bytes(want.data)
            os.chmod(p, want.perm)

    # ------------------------------------------------------------ internals: decisions

    def _reject(self, snap: Snapshot, final: _Final | None, reason: str, violations: list[str],
                notes: list[str]) -> GuardVerdict:
        patch = self._save_patch(snap, final, reason, violations, notes)
        self._restore(snap)
        return GuardVerdict(False, reason, violations, patch, snap.head)

    def _run_check(self) -> str | None:
        """Run the check command; returns None when it passes, else 'exit 1: <tail>'."""
        assert self.check_command
        env, marker = marked_env(None)
        try:
            proc = subprocess.Popen(
                self.check_command, cwd=self.repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            return f"could not start {self.check_command[0]!r}: {exc.strerror or exc}"
        try:
            output, _ = proc.communicate(timeout=self.check_timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            kill_marked(marker)  # an escaped process holding the output pipe would block the read
            output, _ = proc.communicate()
            return f"timed out after {self.check_timeout:g} s: {_tail(output)}"
        finally:
            kill_group(proc.pid)  # nothing the check started outlives it
            kill_marked(marker)
        if proc.returncode != 0:
            return f"exit {proc.returncode}: {_tail(output)}"
        return None

    def _commit(self, final: _Final) -> str:
        head = final.head
        assert head is not None
        head_tree = out(self.repo, "rev-parse", f"{head}^{{tree}}")
        if final.tree != head_tree:
            head = out(self.repo, *IDENTITY, "commit-tree", final.tree, "-p", head, "-m", ACCEPT_MESSAGE)
        # Commit exactly the validated tree; anything the check rewrote in tracked files goes.
        git(self.repo, "reset", "-q", "--hard", head)
        return head

    def _restore(self, snap: Snapshot) -> None:
        """Put the repository back to `snap`: HEAD, branch, working tree, index, permissions."""
        self._restore_internals(snap)
        self._drop_stale_lock()
        if snap.branch:
            git(self.repo, "symbolic-ref", "HEAD", snap.branch)
        else:
            git(self.repo, "update-ref", "--no-deref", "HEAD", snap.head)
        self._unlock_dirs(snap)
        # Files are written back through the attributes in the working tree: drop the agent's
        # first (the snapshot's own come back with the files, ignored ones from their copy).
        attributes = git(self.repo, "ls-files", "-z", "--cached", "--others", "--", ":(glob)**/.gitattributes").stdout
        for rel in z_paths(attributes):
            (self.repo / rel).unlink(missing_ok=True)
        git(self.repo, "reset", "-q", "--hard", snap.head)
        git(self.repo, "clean", "-ffdq", *self._kept_from_clean(snap))
        if snap.stash:
            git(self.repo, "read-tree", "--reset", "-u", f"{snap.stash}^{{tree}}")
            git(self.repo, "read-tree", f"{snap.stash}^2^{{tree}}")
            git(self.repo, "update-index", "-q", "--refresh", check=False)
        self._restore_ignored(snap)
        for rel, perm in snap.perms.items():
            try:
                st = os.lstat(self.repo / rel)
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != perm:
                os.chmod(self.repo / rel, perm)
        head, tree = self._head(), self._worktree_tree(snap.tree)
        if head != snap.head or tree != snap.tree:
            raise GuardError(
                f"rollback of {self.repo} did not restore the snapshot (HEAD {head}, tree {tree}; "
                f"expected {snap.head}, {snap.tree}); restore by hand with `git reset --hard {snap.head}`"
                + (f" and `git stash apply {snap.stash}`" if snap.stash else "")
            )

    def _kept_from_clean(self, snap: Snapshot) -> list[str]:
        """`-e` patterns for `git clean`: the patches dir, and files git ignored at snapshot time
        but no longer ignores (an edited .gitignore, HEAD's .gitignore without the operator's
        uncommitted lines)."""
        patches = ["-e", _literal_pattern(self._patches_in_repo + "/")] if self._patches_in_repo else []
        kept = sorted(rel for rel in snap.ignored_paths if os.path.lexists(self.repo / rel))
        if not kept:
            return patches
        probe = git(self.repo, "check-ignore", "-z", "--stdin", "--no-index", check=False,
                    stdin=b"\0".join(os.fsencode(rel) for rel in kept))
        still = set(z_paths(probe.stdout)) if probe.returncode in (0, 1) else set()
        return patches + [arg for rel in kept if rel not in still for arg in ("-e", _literal_pattern(rel))]

    def _save_patch(self, snap: Snapshot, final: _Final | None, reason: str, violations: list[str],
                    notes: list[str]) -> Path:
        self.patches_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.clock.now().strftime("%Y%m%dT%H%M%SZ")
        name = f"{stamp}-{snap.head[:8]}"
        path = self.patches_dir / f"{name}.patch"
        n = 1
        while path.exists():
            path = self.patches_dir / f"{name}-{n}.patch"
            n += 1
        header = [
            "fleet-supervisor: rejected change (apply with `git apply --binary <this file>`)",
            f"repo: {self.repo}",
            f"reason: {reason}",
            f"snapshot head: {snap.head}",
            f"head after agent: {final.head if final else 'unknown'}",
            *(f"violation: {v}" for v in violations),
        ]
        body = b""
        if final is not None:
            if final.head and final.head != snap.head:
                log = git(self.repo, "log", "--oneline", "--no-decorate", f"{snap.head}..{final.head}", check=False)
                header += ["agent commits:", *log.stdout.decode(errors="replace").splitlines()]
            body = git(self.repo, "diff", "--binary", "--no-ext-diff", "--no-textconv", "-M", snap.tree,
                       final.tree).stdout
        header += notes
        # Every header line starts with "# " so `git apply` skips it and never mistakes it for a hunk.
        text = "".join(f"# {line}\n" for line in header) + "\n"
        path.write_bytes(text.encode(errors="replace") + body)
        return path

    # ------------------------------------------------------------ low level

    def _head(self) -> str | None:
        proc = git(self.repo, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
        return proc.stdout.decode().strip() or None if proc.returncode == 0 else None

    def _branch(self) -> str | None:
        proc = git(self.repo, "symbolic-ref", "-q", "HEAD", check=False)
        return proc.stdout.decode().strip() or None if proc.returncode == 0 else None

    def _listed_files(self) -> list[str]:
        raw = git(self.repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
        return list(dict.fromkeys(z_paths(raw)))

    def _perms(self, paths: Sequence[str]) -> dict[str, int]:
        """Permission bits of files and their parent directories (git keeps only the x bit)."""
        perms: dict[str, int] = {}
        for rel in paths:
            parts = rel.split("/")
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub in perms:
                    continue
                try:
                    st = os.lstat(self.repo / sub)
                except OSError:
                    break
                if not stat.S_ISLNK(st.st_mode):
                    perms[sub] = stat.S_IMODE(st.st_mode)
        return perms

    def _unlock_dirs(self, snap: Snapshot) -> list[tuple[Path, int]]:
        """Give the owner r/x on known directories so git can see inside (chmod 000 on a dir)."""
        changed: list[tuple[Path, int]] = []
        for rel in sorted(snap.perms, key=lambda p: p.count("/")):
            p = self.repo / rel
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o500) != 0o500:
                changed.append((p, stat.S_IMODE(st.st_mode)))
                os.chmod(p, stat.S_IMODE(st.st_mode) | 0o500)
        return changed

    def _worktree_tree(self, base: str, snap: Snapshot | None = None) -> str:
        """A tree object of the whole working tree, built in a private index from `base`.

        The real index is never used: an agent could mark files assume-unchanged or
        skip-worktree there and hide edits. Starting from `base` (not an empty index) keeps
        tracked files that also match .gitignore.
        """
        # Unreadable files would make `git add` fail: lend the owner read access while hashing.
        lent = self._unlock_dirs(snap) if snap else []
        for rel in self._listed_files():
            p = self.repo / rel
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IRUSR:
                lent.append((p, stat.S_IMODE(st.st_mode)))
                os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IRUSR)
        try:
            with tempfile.TemporaryDirectory(prefix="fleet-guard-") as tmp:
                env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
                git(self.repo, "read-tree", base, env=env)
                outside = [f":(exclude,literal){self._patches_in_repo}"] if self._patches_in_repo else []
                git(self.repo, "add", "-A", "--", ".", *outside, env=env)
                return out(self.repo, "write-tree", env=env)
        finally:
            for p, perm in reversed(lent):
                os.chmod(p, perm)

    def _diff(self, a: str, b: str) -> list[_Change]:
        raw = git(self.repo, "diff-tree", "-r", "-z", "-M", "--raw", "--no-commit-id", a, b).stdout
        return _parse_raw(raw)

    def _repair_index(self, snap: Snapshot, found: dict[str, list[str]]) -> None:
        """A damaged index is an agent's doing: report it and rebuild it from the snapshot's HEAD."""
        probe = git(self.repo, "ls-files", "-z", "--cached", check=False)
        if probe.returncode == 0:
            return
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        found.setdefault(".git/index", []).append(f"damaged: {lines[-1] if lines else 'unreadable'}")
        (self.git_dir / "index").unlink(missing_ok=True)
        git(self.repo, "read-tree", snap.head)

    def _drop_stale_lock(self) -> None:
        # The agent has exited; a lock it left would block every later git write.
        (self.git_dir / "index.lock").unlink(missing_ok=True)

    def _read_internals(self) -> dict[str, _Internal]:
        found: dict[str, _Internal] = {}
        for name in GUARDED_INTERNALS:
            root = self.common_dir / name
            _read_entry(root, name, found)
            if root.is_dir() and not root.is_symlink():
                for dirpath, dirnames, filenames in os.walk(root):
                    for entry in [*dirnames, *filenames]:
                        full = Path(dirpath) / entry
                        _read_entry(full, str(full.relative_to(self.common_dir)), found)
        return found

    def _restore_internals(self, snap: Snapshot) -> None:
        """Write back the git internals, then bring back the snapshot's objects if the agent
        destroyed them (deleted refs, expired reflogs, `git gc --prune=now`)."""
        self._restore_internal_files(snap)
        lost = [sha for sha in (snap.head, snap.stash)
                if sha and git(self.repo, "cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode]
        if lost:
            git(self.repo, "fetch", "-q", "--no-tags", "--no-write-fetch-head", str(self._backup),
                *(f"{BACKUP_REFS}/{sha}" for sha in lost))
            if snap.stash:
                git(self.repo, "update-ref", SNAPSHOT_REF, snap.stash)

    @property
    def _backup(self) -> Path:
        """A bare repository beside the kept patches: everything in the guarded repo, refs and
        objects included, is the agent's to break."""
        name = hashlib.sha256(str(self.repo).encode()).hexdigest()[:16]
        return self.patches_dir.resolve() / ".snapshots" / f"{name}.git"

    def _keep_outside(self, head: str, stash: str | None) -> None:
        backup = self._backup
        if not (backup / "HEAD").exists():
            backup.mkdir(parents=True, exist_ok=True)
            git(backup, "init", "-q", "--bare")
        refs = [f"+{sha}:{BACKUP_REFS}/{sha}" for sha in (head, stash) if sha]
        git(self.repo, "push", "-q", "--no-verify", str(backup), *refs)

    def _restore_internal_files(self, snap: Snapshot) -> None:
        now = self._read_internals()
        if now == dict(snap.internals):
            return
        # Remove what the agent added (deepest first), then write back what was there.
        for rel in sorted(set(now) - set(snap.internals), key=lambda r: -r.count("/")):
            p = self.common_dir / rel
            if now[rel].kind == "dir":
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for rel in sorted(snap.internals, key=lambda r: r.count("/")):
            want, have = snap.internals[rel], now.get(rel)
            p = self.common_dir / rel
            if want == have:
                continue
            if have is not None and have.kind != want.kind:
                shutil.rmtree(p) if have.kind == "dir" else p.unlink()
            if want.kind == "dir":
                p.mkdir(parents=True, exist_ok=True)
            elif want.kind == "link":
                p.unlink(missing_ok=True)
                os.symlink(want.data.decode(errors="surrogateescape"), p)
                continue
            else:
                if p.exists():
                    os.chmod(p, 0o600)
                p.write_bytes(want.data)
            os.chmod(p, want.perm)


# ---------------------------------------------------------------- helpers


def _read_entry(path: Path, rel: str, found: dict[str, _Internal]) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        return
    perm = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        found[rel] = _Internal("link", perm, os.readlink(path).encode(errors="surrogateescape"))
    elif stat.S_ISDIR(st.st_mode):
        found[rel] = _Internal("dir", perm)
    else:
        try:
            data = path.read_bytes()
        except OSError:
            data = b"<unreadable>"
        found[rel] = _Internal("file", perm, data)


def _parse_raw(raw: bytes) -> list[_Change]:
    """Parse `git diff-tree -z --raw`: ':old new oldsha newsha S\\0path\\0[path2\\0]'."""
    fields = raw.split(b"\0")
    changes: list[_Change] = []
    i = 0
    while i < len(fields):
        head = fields[i].decode()
        if not head.startswith(":"):
            i += 1
            continue
        old_mode, new_mode, _old_sha, new_sha, status = head[1:].split(" ")
        letter, score = status[0], int(status[1:] or 100)
        old_path = fields[i + 1].decode(errors="surrogateescape")
        if letter in "RC":
            new_path = fields[i + 2].decode(errors="surrogateescape")
            i += 3
        else:
            new_path = old_path
            i += 2
        changes.append(_Change(letter, old_path, new_path, old_mode, new_mode, new_sha, score))
    return changes


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


def _tail(output: bytes | None) -> str:
    text = " ".join((output or b"").decode(errors="replace").split())
    return text[-_TAIL_CHARS:] if text else "(no output)"


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


__all__ = ["ALWAYS_PROTECTED", "ChangeGuard", "GuardVerdict", "ProtectedPaths", "Snapshot"]
