"""Stopping a child process with everything it started: its tree, its process group, and
(by an environment marker) the processes that left both."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from typing import Mapping

import psutil

# Every process a marked command starts inherits this variable: the ones that leave its
# process group (setsid, double fork) are still found, and stopped.
RUN_MARKER = "FLEET_SUPERVISOR_RUN"


def stop_process_tree(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM the process group and tree, wait, then SIGKILL whatever survives.

    The child must lead its own group (`start_new_session=True`): a grandchild whose parent
    exited is no longer in the tree, but it is still in the group. Returns the exit code, or
    None if the child could not be reaped.
    """
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        family = []
    _signal_group(proc.pid, signal.SIGTERM)
    for p in family:  # children that left the group still get the signal
        try:
            p.terminate()
        except psutil.Error:
            pass
    alive = _wait_gone(proc, family, timeout)
    _signal_group(proc.pid, signal.SIGKILL)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_gone(proc, alive, 1)
    try:
        return proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(proc: subprocess.Popen, family: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every member exited; a zombie counts as gone (its parent, maybe init, reaps it)."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap our own child so it does not linger as a zombie
        alive = []
        for p in family:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group (a child started with `start_new_session=True` leads one)."""
    _signal_group(pgid, signal.SIGKILL)


def marked_env(env: Mapping[str, str] | None) -> tuple[dict[str, str], str]:
    """`env` (None: ours) plus a fresh RUN_MARKER; returns the environment and the marker."""
    marker = uuid.uuid4().hex
    return {**(os.environ if env is None else env), RUN_MARKER: marker}, marker


def kill_marked(marker: str, rounds: int = 20) -> None:
    """SIGKILL every process started with this run's marker, wherever it moved.

    A mitigation: a process that execs itself with a scrubbed environment is not found.
    """
    for _ in range(rounds):  # another pass for children forked while the last one killed
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(RUN_MARKER) == marker:
                    p.kill()
                    found.append(p)
            except psutil.Error:
                continue
        if not found:
            return
        _wait_dead(found, timeout=1)


def _wait_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Until each process has ended; a zombie has (its new parent, maybe a lax init, reaps it)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            while p.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                time.sleep(0.01)
        except psutil.NoSuchProcess:
            continue
