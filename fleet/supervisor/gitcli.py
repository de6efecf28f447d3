"""The git command line as the supervisor uses it: argv lists, no hooks, no pager, raw paths."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from fleet.errors import GuardError

# Every call: raw (unquoted) paths, and none of the repository's own code paths run —
# hooks and fsmonitor are agent-writable configuration, so they are switched off here.
GIT_BASE = (
    "git",
    "-c",
    "core.quotepath=off",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "advice.detachedHead=false",
    "-c",
    "gc.auto=0",
)
IDENTITY = ("-c", "user.name=fleet-supervisor", "-c", "user.email=supervisor@fleet.local")

# Inherited variables that would point git at another repository or index.
_SCRUBBED = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_COMMON_DIR",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CEILING_DIRECTORIES",
    "GIT_NAMESPACE",
)


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUBBED and not k.startswith("GIT_CONFIG_")
    }
    # Replace refs are agent-writable and would let a forged object stand in for the snapshot's.
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_PAGER": "cat",
            "LC_ALL": "C",
            "GIT_NO_REPLACE_OBJECTS": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


def git(
    repo: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
    stdin: bytes = b"",
) -> subprocess.CompletedProcess[bytes]:
    """Run one git command in `repo` (`stdin` as its input).

    Raises GuardError with git's own words when it fails.
    """
    argv: Sequence[str] = [*GIT_BASE, *args]
    try:
        proc = subprocess.run(
            argv, cwd=repo, capture_output=True, env=git_env(env), timeout=timeout, input=stdin
        )
    except FileNotFoundError as exc:
        raise GuardError(
            "git is not installed or not on PATH; the supervisor needs the git CLI"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuardError(
            f"git {' '.join(args[:2])} did not finish within {timeout:.0f} s in {repo}"
        ) from exc
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = err[-1] if err else f"exit {proc.returncode}"
        raise GuardError(f"git {' '.join(args[:2])} failed in {repo}: {detail}")
    return proc


def out(repo: Path, *args: str, **kw) -> str:
    return git(repo, *args, **kw).stdout.decode(errors="surrogateescape").strip()


def z_paths(raw: bytes) -> list[str]:
    """Split NUL-separated git output; paths may hold spaces and newlines."""
    return [p.decode(errors="surrogateescape") for p in raw.split(b"\0") if p]
