"""What in an agent's change touches a protected path: the diff (renames, deletions, modes,
symlinks), permission bits git does not track, and where HEAD went."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fleet.supervisor.gitcli import git
from fleet.supervisor.internals import Found
from fleet.supervisor.paths import ProtectedPaths
from fleet.supervisor.snapshot import SYMLINK_MODE, Change, Final, Snapshot


def protected_changes(
    repo: Path, protected: ProtectedPaths, snap: Snapshot, final: Final, found: Found
) -> None:
    """Record in `found` every way `final` touches a protected path, or moved HEAD off `snap`."""
    for change in final.changes:
        for path, kind in change.kinds().items():
            if protected.matches(path):
                found.setdefault(path, []).append(kind)
        if change.new_mode == SYMLINK_MODE:
            _symlink(repo, protected, change, found)
    # Permission bits git does not track (chmod 000 keeps git's mode 100644).
    for path, perm in snap.perms.items():
        if not protected.matches(path):
            continue
        try:
            st = os.lstat(repo / path)
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
        ancestor = git(repo, "merge-base", "--is-ancestor", snap.head, final.head, check=False)
        if ancestor.returncode != 0:
            found.setdefault("HEAD", []).append(
                f"history rewritten: {final.head[:12]} does not descend from {snap.head[:12]}"
            )
    if final.branch != snap.branch:
        found.setdefault("HEAD", []).append(
            f"switched from {snap.branch or 'detached'} to {final.branch or 'detached'}"
        )


def _symlink(repo: Path, protected: ProtectedPaths, change: Change, found: Found) -> None:
    """A new symlink may not point at a protected path, nor out of the repo."""
    path = change.new_path
    target = git(repo, "cat-file", "blob", change.new_sha).stdout.decode(errors="surrogateescape")
    lexical = (
        target
        if os.path.isabs(target)
        else os.path.normpath(os.path.join(os.path.dirname(path), target))
    )
    for cand in (lexical, os.path.realpath(repo / path)):
        if os.path.isabs(cand):
            rel = os.path.relpath(cand, repo) if _inside(cand, repo) else None
        else:
            rel = cand if cand != ".." and not cand.startswith("../") else None
        if rel is None:
            found.setdefault(path, []).append(f"symlink pointing outside the repo: -> {target}")
            return
        if rel != "." and protected.matches(rel):
            found.setdefault(path, []).append(f"symlink to protected path {rel}")
            return


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False
