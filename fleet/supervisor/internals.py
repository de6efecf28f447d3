"""Byte-for-byte copies of what git cannot restore: the `.git` internals an agent could abuse
to run code or forge what git shows, and protected files that git ignores."""

from __future__ import annotations

import difflib
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Git internals an agent could use to run code or hide files (relative to the common git dir);
# replace refs would show the operator's own git a forged tree.
GUARDED_INTERNALS = (
    "config",
    "hooks",
    "info",
    "objects/info/alternates",
    "objects/info/http-alternates",
    "refs/replace",
)

Found = dict[str, list[str]]  # path → what happened to it, in operator words


@dataclass(frozen=True)
class Entry:
    """One file, directory or symlink as read: kind, permission bits, bytes (a link's target)."""

    kind: str  # "file" | "dir" | "link"
    perm: int
    data: bytes = b""


def read_entry(path: Path, rel: str, found: dict[str, Entry]) -> None:
    """Add `path` to `found` under `rel`; a path that does not exist is left out."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    perm = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        found[rel] = Entry("link", perm, os.readlink(path).encode(errors="surrogateescape"))
    elif stat.S_ISDIR(st.st_mode):
        found[rel] = Entry("dir", perm)
    else:
        try:
            data = path.read_bytes()
        except OSError:
            data = b"<unreadable>"
        found[rel] = Entry("file", perm, data)


def change_kind(
    before: Entry | None,
    after: Entry | None,
    *,
    added: str = "added",
    deleted: str = "deleted",
    modified: str = "modified",
) -> str:
    """How a file the repo's history does not track changed between two readings."""
    if before is None:
        return added
    if after is None:
        return deleted
    if before.kind != after.kind or before.data != after.data:
        return modified
    return f"permissions {before.perm:04o} -> {after.perm:04o}"


# ---------------------------------------------------------------- git internals


def read_internals(common_dir: Path) -> dict[str, Entry]:
    """The guarded internals under the common git dir, every entry below a directory included."""
    found: dict[str, Entry] = {}
    for name in GUARDED_INTERNALS:
        root = common_dir / name
        read_entry(root, name, found)
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                for entry in [*dirnames, *filenames]:
                    full = Path(dirpath) / entry
                    read_entry(full, str(full.relative_to(common_dir)), found)
    return found


def internals_changes(
    saved: Mapping[str, Entry], now: Mapping[str, Entry], found: Found
) -> list[str]:
    """Record each changed internal as `.git/<path>` in `found`; returns text diffs for a patch."""
    notes: list[str] = []
    for rel in sorted(set(saved) | set(now)):
        before, after = saved.get(rel), now.get(rel)
        if before == after:
            continue
        shown = f".git/{rel}"
        kind = change_kind(before, after)
        found.setdefault(shown, []).append(kind)
        if (before is None or before.kind == "file") and (after is None or after.kind == "file"):
            old = (before.data if before else b"").decode(errors="replace").splitlines()
            new = (after.data if after else b"").decode(errors="replace").splitlines()
            notes.append(f"{shown} ({kind})")
            notes.extend(difflib.unified_diff(old, new, f"a/{shown}", f"b/{shown}", lineterm=""))
    return notes


def restore_internals(common_dir: Path, saved: Mapping[str, Entry]) -> None:
    """Write the internals back as `saved`: what the agent added goes, what it changed returns."""
    now = read_internals(common_dir)
    if now == dict(saved):
        return
    # Remove what the agent added (deepest first), then write back what was there.
    for rel in sorted(set(now) - set(saved), key=lambda r: -r.count("/")):
        p = common_dir / rel
        if now[rel].kind == "dir":
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for rel in sorted(saved, key=lambda r: r.count("/")):
        want, have = saved[rel], now.get(rel)
        p = common_dir / rel
        if want == have:
            continue
        if have is not None and have.kind != want.kind:
            if have.kind == "dir":
                shutil.rmtree(p)
            else:
                p.unlink()
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


# ---------------------------------------------------------------- ignored protected files


def read_files(repo: Path, rels: Iterable[str]) -> dict[str, Entry]:
    """Copies of the files `rels` (relative to the repo) as they are now."""
    found: dict[str, Entry] = {}
    for rel in rels:
        read_entry(repo / rel, rel, found)
    return found


def ignored_changes(saved: Mapping[str, Entry], now: Mapping[str, Entry], found: Found) -> None:
    """Record each protected, git-ignored file that was added, changed or removed."""
    for rel in sorted(set(saved) | set(now)):
        before, after = saved.get(rel), now.get(rel)
        if before == after:
            continue
        found.setdefault(rel, []).append(
            change_kind(
                before,
                after,
                added="added, ignored by git",
                deleted="deleted or no longer ignored",
                modified="modified, ignored by git",
            )
        )


def restore_files(repo: Path, saved: Mapping[str, Entry], now: Mapping[str, Entry]) -> None:
    """Put the copied files back as `saved`; files in `now` but not saved are removed."""
    for rel in set(now) - set(saved):
        (repo / rel).unlink(missing_ok=True)
    for rel, want in saved.items():
        if now.get(rel) == want:
            continue
        p = repo / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
        if want.kind == "link":
            os.symlink(want.data.decode(errors="surrogateescape"), p)
            continue
        p.write_bytes(want.data)
        os.chmod(p, want.perm)
