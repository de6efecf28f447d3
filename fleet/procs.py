"""Stopping a child process with everything it started: its tree and its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil


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
