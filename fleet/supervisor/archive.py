"""What the guard keeps outside the agent's reach: rejected changes as patches, and each
snapshot's commits in a bare repository of its own (the newest `keep_commits` of them)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from fleet.errors import GuardError
from fleet.supervisor.gitcli import git, out
from fleet.supervisor.snapshot import Final, Snapshot

KEEP_COMMITS = 10  # snapshots kept in the archive per repository (the seed's rollback.keep_commits)
# + "<zero-padded sequence number>-<tip sha prefix>": sorted by name, oldest first.
SNAPSHOT_REFS = "refs/fleet-supervisor/snapshots/"
_LEGACY_REFS = "refs/fleet-supervisor/"  # earlier archives named each kept commit by its sha


class SnapshotArchive:
    """A bare repository beside the kept patches: everything in the guarded repo, refs and
    objects included, is the agent's to break. One ref per snapshot keeps its commits (the
    uncommitted work's commit has HEAD as its parent); older snapshots are pruned."""

    def __init__(self, repo: Path, patches_dir: Path, keep_commits: int = KEEP_COMMITS):
        if keep_commits < 1:
            raise GuardError(f"keep_commits must be at least 1, not {keep_commits}")
        self.repo = repo
        name = hashlib.sha256(str(repo).encode()).hexdigest()[:16]
        self.path = patches_dir.resolve() / ".snapshots" / f"{name}.git"
        self.keep_commits = keep_commits

    def store(self, head: str, stash: str | None) -> str:
        """Copy a snapshot's commits into the archive; returns the ref that keeps them."""
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            git(self.path, "init", "-q", "--bare")
        refs = self.refs()
        last = int(refs[-1].removeprefix(SNAPSHOT_REFS).split("-")[0]) if refs else 0
        tip = stash or head
        # The tip in the name: two guards numbering at once never overwrite each other's snapshot.
        ref = f"{SNAPSHOT_REFS}{last + 1:010d}-{tip[:12]}"
        git(self.repo, "push", "-q", "--no-verify", str(self.path), f"{tip}:{ref}")
        self.prune()
        return ref

    def refs(self) -> list[str]:
        """The snapshot refs, oldest first."""
        listed = out(self.path, "for-each-ref", "--format=%(refname)", SNAPSHOT_REFS)
        return sorted(listed.splitlines())

    def prune(self) -> list[str]:
        """Drop all but the newest `keep_commits` snapshots and the objects only they kept."""
        everything = out(
            self.path, "for-each-ref", "--format=%(refname)", _LEGACY_REFS
        ).splitlines()
        kept = set(
            sorted(ref for ref in everything if ref.startswith(SNAPSHOT_REFS))[-self.keep_commits :]
        )
        dropped = sorted(ref for ref in everything if ref not in kept)
        if not dropped:
            return []
        git(
            self.path,
            "update-ref",
            "--stdin",
            stdin="".join(f"delete {ref}\n" for ref in dropped).encode(),
        )
        # Snapshot objects arrive in small pushes and stay loose: prune (not a full gc) frees them.
        git(self.path, "prune", "--expire=now")
        return dropped

    def recover(self, snap: Snapshot) -> None:
        """Bring the snapshot's commits back into the guarded repo (the agent destroyed them)."""
        if not snap.archive_ref or snap.archive_ref not in self.refs():
            raise GuardError(
                f"the snapshot of {self.repo} at {snap.head[:12]} lost its commits and is "
                f"no longer in the archive (it keeps the newest {self.keep_commits}); "
                f"restore by hand from {self.path}"
            )
        git(
            self.repo,
            "fetch",
            "-q",
            "--no-tags",
            "--no-write-fetch-head",
            str(self.path),
            snap.archive_ref,
        )


def save_patch(
    patches_dir: Path,
    repo: Path,
    snap: Snapshot,
    final: Final | None,
    reason: str,
    violations: Sequence[str],
    notes: Sequence[str],
    now: datetime,
) -> Path:
    """Keep the difference between `snap` and what the agent left as a patch `git apply` takes."""
    patches_dir.mkdir(parents=True, exist_ok=True)
    name = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{snap.head[:8]}"
    path = patches_dir / f"{name}.patch"
    n = 1
    while path.exists():
        path = patches_dir / f"{name}-{n}.patch"
        n += 1
    header = [
        "fleet-supervisor: rejected change (apply with `git apply --binary <this file>`)",
        f"repo: {repo}",
        f"reason: {reason}",
        f"snapshot head: {snap.head}",
        f"head after agent: {final.head if final else 'unknown'}",
        *(f"violation: {v}" for v in violations),
    ]
    body = b""
    if final is not None:
        if final.head and final.head != snap.head:
            log = git(
                repo, "log", "--oneline", "--no-decorate", f"{snap.head}..{final.head}", check=False
            )
            header += ["agent commits:", *log.stdout.decode(errors="replace").splitlines()]
        body = git(
            repo, "diff", "--binary", "--no-ext-diff", "--no-textconv", "-M", snap.tree, final.tree
        ).stdout
    header += notes
    # Every header line starts with "# " so `git apply` skips it and never mistakes it for a hunk.
    text = "".join(f"# {line}\n" for line in header) + "\n"
    path.write_bytes(text.encode(errors="replace") + body)
    return path
