"""Git state of a guarded repository: HEAD, branch, the whole working tree as a tree object,
permissions, and the snapshot (a commit of the uncommitted work) taken before an agent runs."""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fleet.errors import GuardError
from fleet.supervisor.gitcli import IDENTITY, git, out, z_paths
from fleet.supervisor.internals import Entry, Found

SNAPSHOT_REF = "refs/fleet-supervisor/snapshot"
SYMLINK_MODE = "120000"


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
    internals: Mapping[str, Entry] = field(default_factory=dict, repr=False, compare=False)
    # Protected files git ignores (a local supervisor.yaml, .env): git cannot restore them, so
    # we keep a copy.
    ignored: Mapping[str, Entry] = field(default_factory=dict, repr=False, compare=False)
    # Every file git ignored: a rollback never deletes one, even if .gitignore no longer ignores it.
    ignored_paths: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)
    # The ref in the guard's own bare repository that keeps this snapshot's commits.
    archive_ref: str = field(default="", compare=False)


def dump_snapshot(snap: Snapshot) -> str:
    """The whole snapshot as JSON (bytes as base64), to be recorded before the agent runs:
    a resumed run validates against exactly this, never a snapshot of what the agent left."""

    def entries(found: Mapping[str, Entry]) -> dict[str, list]:
        return {
            rel: [e.kind, e.perm, base64.b64encode(e.data).decode()] for rel, e in found.items()
        }

    return json.dumps(
        {
            "repo": str(snap.repo),
            "head": snap.head,
            "stash": snap.stash,
            "taken_at": snap.taken_at.isoformat(),
            "tree": snap.tree,
            "branch": snap.branch,
            "perms": dict(snap.perms),
            "internals": entries(snap.internals),
            "ignored": entries(snap.ignored),
            "ignored_paths": sorted(snap.ignored_paths),
            "archive_ref": snap.archive_ref,
        }
    )


def load_snapshot(text: str) -> Snapshot:
    """The snapshot `dump_snapshot` wrote; its commits are in the repo or the guard's archive."""
    raw = json.loads(text)

    def entries(found: Mapping[str, list]) -> dict[str, Entry]:
        return {
            rel: Entry(kind, perm, base64.b64decode(data))
            for rel, (kind, perm, data) in found.items()
        }

    return Snapshot(
        repo=Path(raw["repo"]),
        head=raw["head"],
        stash=raw["stash"],
        taken_at=datetime.fromisoformat(raw["taken_at"]),
        tree=raw["tree"],
        branch=raw["branch"],
        perms=raw["perms"],
        internals=entries(raw["internals"]),
        ignored=entries(raw["ignored"]),
        ignored_paths=frozenset(raw["ignored_paths"]),
        archive_ref=raw["archive_ref"],
    )


@dataclass(frozen=True)
class Change:
    """One entry of `git diff-tree --raw`."""

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
            return {
                self.old_path: f"renamed to {self.new_path}{edited}",
                self.new_path: f"renamed from {self.old_path}{edited}",
            }
        if s == "C":
            return {self.new_path: f"copied from {self.old_path}"}
        if self.old_mode != self.new_mode:
            return {self.new_path: f"mode changed {self.old_mode} -> {self.new_mode}"}
        return {self.new_path: "modified"}


@dataclass
class Final:
    """What the agent left behind."""

    head: str | None
    branch: str | None
    tree: str
    changes: list[Change]


class GuardedRepo:
    """A repository root as git sees it, read and written only through our own git calls."""

    def __init__(self, repo: Path, patches_in_repo: str | None = None):
        self.path = repo
        # Kept patches inside the repo are the guard's files, never part of the compared tree.
        self.patches_in_repo = patches_in_repo
        try:
            top = out(repo, "rev-parse", "--show-toplevel")
        except GuardError as exc:
            raise GuardError(
                f"{repo} is not a git repository; run `git init` and commit once ({exc})"
            ) from exc
        if Path(top).resolve() != repo:
            raise GuardError(
                f"{repo} is inside the repository {top}; guard the repository root instead"
            )
        self.git_dir = Path(out(repo, "rev-parse", "--absolute-git-dir"))
        common = Path(out(repo, "rev-parse", "--git-common-dir"))
        self.common_dir = common if common.is_absolute() else (repo / common).resolve()

    def head(self) -> str | None:
        proc = git(self.path, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
        return (proc.stdout.decode().strip() or None) if proc.returncode == 0 else None

    def branch(self) -> str | None:
        proc = git(self.path, "symbolic-ref", "-q", "HEAD", check=False)
        return (proc.stdout.decode().strip() or None) if proc.returncode == 0 else None

    def tree_of(self, commit: str) -> str:
        return out(self.path, "rev-parse", f"{commit}^{{tree}}")

    def stash(self, head: str) -> tuple[str, str | None]:
        """The working tree's tree, and a commit of the uncommitted work (None when there is none).

        Like `git stash create`, but the untracked files are in the tree too: parent 1 = HEAD,
        parent 2 = the index as a commit. A ref keeps it alive if anything runs `git gc`.
        """
        index_tree = git(self.path, "write-tree", check=False)
        if index_tree.returncode != 0:
            raise GuardError(
                f"the index of {self.path} has unresolved conflicts; "
                "resolve them before supervising"
            )
        index_tree_sha = index_tree.stdout.decode().strip()
        tree = self.worktree_tree(head)
        head_tree = self.tree_of(head)
        if tree == head_tree and index_tree_sha == head_tree:
            return tree, None
        msg = "fleet-supervisor snapshot"
        index_commit = out(
            self.path, *IDENTITY, "commit-tree", index_tree_sha, "-p", head, "-m", f"{msg} (index)"
        )
        stash = out(
            self.path, *IDENTITY, "commit-tree", tree, "-p", head, "-p", index_commit, "-m", msg
        )
        git(self.path, "update-ref", "-m", msg, SNAPSHOT_REF, stash)
        return tree, stash

    def listed_files(self) -> list[str]:
        raw = git(self.path, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
        return list(dict.fromkeys(z_paths(raw)))

    def ignored_files(self) -> list[str]:
        return z_paths(
            git(self.path, "ls-files", "-z", "--others", "--ignored", "--exclude-standard").stdout
        )

    def perms(self, paths: Sequence[str]) -> dict[str, int]:
        """Permission bits of files and their parent directories (git keeps only the x bit)."""
        perms: dict[str, int] = {}
        for rel in paths:
            parts = rel.split("/")
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub in perms:
                    continue
                try:
                    st = os.lstat(self.path / sub)
                except OSError:
                    break
                if not stat.S_ISLNK(st.st_mode):
                    perms[sub] = stat.S_IMODE(st.st_mode)
        return perms

    def unlock_dirs(self, perms: Mapping[str, int]) -> list[tuple[Path, int]]:
        """Give the owner r/x on known directories so git can see inside (chmod 000 on a dir)."""
        changed: list[tuple[Path, int]] = []
        for rel in sorted(perms, key=lambda p: p.count("/")):
            p = self.path / rel
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o500) != 0o500:
                changed.append((p, stat.S_IMODE(st.st_mode)))
                os.chmod(p, stat.S_IMODE(st.st_mode) | 0o500)
        return changed

    def worktree_tree(self, base: str, perms: Mapping[str, int] | None = None) -> str:
        """A tree object of the whole working tree, built in a private index from `base`.

        The real index is never used: an agent could mark files assume-unchanged or
        skip-worktree there and hide edits. Starting from `base` (not an empty index) keeps
        tracked files that also match .gitignore. With `perms`, directories the agent locked
        are opened while hashing.
        """
        # Unreadable files would make `git add` fail: lend the owner read access while hashing.
        lent = self.unlock_dirs(perms) if perms else []
        for rel in self.listed_files():
            p = self.path / rel
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
                git(self.path, "read-tree", base, env=env)
                outside = (
                    [f":(exclude,literal){self.patches_in_repo}"] if self.patches_in_repo else []
                )
                git(self.path, "add", "-A", "--", ".", *outside, env=env)
                return out(self.path, "write-tree", env=env)
        finally:
            for p, perm in reversed(lent):
                os.chmod(p, perm)

    def diff(self, a: str, b: str) -> list[Change]:
        raw = git(self.path, "diff-tree", "-r", "-z", "-M", "--raw", "--no-commit-id", a, b).stdout
        return parse_raw(raw)

    def inspect(self, snap: Snapshot) -> Final:
        """What changed since `snap`, in the working tree and in commits made since."""
        head = self.head()
        branch = self.branch()
        tree = self.worktree_tree(snap.tree, snap.perms)
        changes = self.diff(snap.tree, tree)
        if head is not None and head != snap.head:
            # A change committed and then undone in the working tree still counts.
            head_tree = self.tree_of(head)
            if head_tree != tree:
                changes += self.diff(snap.tree, head_tree)
        return Final(head=head, branch=branch, tree=tree, changes=changes)

    def repair_index(self, head: str, found: Found) -> None:
        """A damaged index is an agent's doing: report it and rebuild it from `head`."""
        probe = git(self.path, "ls-files", "-z", "--cached", check=False)
        if probe.returncode == 0:
            return
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        found.setdefault(".git/index", []).append(
            f"damaged: {lines[-1] if lines else 'unreadable'}"
        )
        (self.git_dir / "index").unlink(missing_ok=True)
        git(self.path, "read-tree", head)

    def drop_stale_lock(self) -> None:
        # The agent has exited; a lock it left would block every later git write.
        (self.git_dir / "index.lock").unlink(missing_ok=True)


def parse_raw(raw: bytes) -> list[Change]:
    """Parse `git diff-tree -z --raw`: ':old new oldsha newsha S\\0path\\0[path2\\0]'."""
    fields = raw.split(b"\0")
    changes: list[Change] = []
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
        changes.append(Change(letter, old_path, new_path, old_mode, new_mode, new_sha, score))
    return changes
