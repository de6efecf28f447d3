"""Fixtures of the supervisor tests: real git repositories in tmp dirs and a state fingerprint."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

GIT = [
    "git",
    "-c",
    "user.name=test",
    "-c",
    "user.email=test@example.invalid",
    "-c",
    "init.defaultBranch=main",
]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def fingerprint(repo: Path) -> dict:
    """Everything a rollback must restore: files (type, permissions, bytes), index, HEAD, branch."""
    files: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == repo and d == ".git")]
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(repo))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                files[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                files[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                files[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    hooks = sorted(os.listdir(repo / ".git" / "hooks"))
    return {
        "files": files,
        "head": git(repo, "rev-parse", "HEAD"),
        "branch": git(repo, "symbolic-ref", "-q", "HEAD"),
        "status": git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all"),
        "staged": git(repo, "diff", "--cached", "--binary"),
        "hooks": hooks,
        "config": (repo / ".git" / "config").read_bytes(),
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An app repo: app.py, a protected ci/ dir, a lock file, a README; one commit on main."""
    root = tmp_path / "app"
    root.mkdir()
    git(root, "init", "-q")
    (root / "app.py").write_text("import time\nprint('app up', flush=True)\ntime.sleep(30)\n")
    (root / "ci").mkdir()
    (root / "ci" / "protected.cfg").write_text("checks = strict\n")
    (root / "deps.lock").write_text("pinned==1.0\n")
    (root / "README.md").write_text("# app\n")
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root


def agent(repo: Path, code: str) -> None:
    """A real agent process: a python child that edits the repo."""
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=30)


def escapee(pidfile: Path) -> list[str]:
    """A command that leaves behind a process in a session of its own (setsid) that would edit
    ci/protected.cfg later; it exits once that process has written its pid to `pidfile`."""
    later = (
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(10); "
        "open('ci/protected.cfg', 'w').write('off\\n')"
    )
    return [
        sys.executable,
        "-c",
        f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {later!r}], "
        f"start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"while not os.path.exists({str(pidfile)!r})"
        f" or not open({str(pidfile)!r}).read(): time.sleep(0.01)",
    ]


def gone(pidfile: Path) -> bool:
    """The process whose pid is in `pidfile` has ended (a zombie waiting for init counts as
    ended)."""
    try:
        return psutil.Process(int(pidfile.read_text())).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
