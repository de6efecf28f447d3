"""Agents die with their run: one reaper per orchestrator process SIGKILLs them when it dies.

    python -m fleet.tether RUN_PID TOKEN

The local executor starts it on its first agent start in a process (`process_reaper`), with a
pipe as its stdin, and tells it of every agent, one line each: `+ PGID MARKER` once the agent
runs (it leads its own process group), `- PGID` once the orchestrator has reaped it (from then
on the id may name someone else's group). The reaper waits on a pidfd of the run (the
orchestrator process, by pid — not the thread that started it) and on that pipe. When the run
exits in any way, `kill -9` included, it SIGKILLs every registered group, every process carrying
a registered marker (what left its group with setsid) and every process whose TOKEN_VAR is
TOKEN (an agent killed with the run before it was registered), then exits. A run exiting by
itself says `bye` first (atexit): with no agent registered the reaper then exits at once.

Only this host's processes can be reached this way; an agent on a gateway is the gateway's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import subprocess
import sys
import threading

# Every local agent's environment carries its orchestrator's reaper token here (not a secret).
TOKEN_VAR = "FLEET_REAPER"
USAGE = "usage: python -m fleet.tether RUN_PID TOKEN"

log = logging.getLogger("fleet.tether")


class Reaper:
    """This process's reaper, seen from here: the pipe to it and the agents it was told of.

    A reaper found dead (killed on its own) is replaced, and the replacement is told of every
    agent not reaped yet: a stage never sees it.
    """

    def __init__(self) -> None:
        self.token = os.urandom(8).hex()
        self._groups: dict[int, str] = {}  # pgid -> marker, of every agent not reaped yet
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._owner = os.getpid()
        atexit.register(self.bye)

    def ensure(self) -> str:
        """Start the reaper unless it runs (before an agent starts); returns the token."""
        with self._lock:
            if self._proc is None:
                self._start()
            elif self._proc.poll() is not None:
                self._replace(f"it exited with code {self._proc.returncode}")
        return self.token

    def register(self, pgid: int, marker: str) -> None:
        with self._lock:
            self._groups[pgid] = marker
            self._tell(f"+ {pgid} {marker}\n")

    def unregister(self, pgid: int) -> None:
        with self._lock:
            if self._groups.pop(pgid, None) is not None:
                self._tell(f"- {pgid}\n")

    def bye(self) -> None:
        """This process is exiting by itself (atexit): a reaper with no agent left then exits
        at once, without searching the process table for its token."""
        if os.getpid() != self._owner:  # a forked child's exit is not its parent's
            return
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                with contextlib.suppress(OSError):  # a reaper already gone needs no word
                    self._proc.stdin.write(b"bye\n")

    def _start(self) -> None:
        # A session of its own: a kill of the orchestrator's process group spares it.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.tether", str(os.getpid()), self.token],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            bufsize=0,
        )
        for pgid, marker in self._groups.items():
            self._tell(f"+ {pgid} {marker}\n")

    def _tell(self, line: str) -> None:
        """Write one line (shorter than PIPE_BUF, so whole or not at all)."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode())
        except OSError as exc:
            self._replace(exc.strerror or str(exc))

    def _replace(self, why: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        log.warning(
            "the reaper (pid %s) is gone (%s): starting another for %d running agents",
            self._proc.pid,
            why,
            len(self._groups),
        )
        self._proc.stdin.close()
        self._proc.poll()
        self._start()


_reapers: dict[int, Reaper] = {}
_reapers_lock = threading.Lock()


def process_reaper() -> Reaper:
    """The reaper of this process: a forked child (a flow run's subprocess) gets its own."""
    with _reapers_lock:
        reaper = _reapers.get(os.getpid())
        if reaper is None:
            reaper = _reapers[os.getpid()] = Reaper()
        return reaper


def _watch(run: int, groups: dict[int, str]) -> bool:
    """Keep `groups` as the run says, until the run exits or its pipe closes; True when the
    run said `bye` (it is exiting by itself, not killed)."""
    pending, bye = b"", False
    while True:
        ready, _, _ = select.select([run, 0], [], [])
        if 0 in ready:  # before the run's exit: what it said just before it died counts
            chunk = os.read(0, 65536)
            if not chunk:
                return bye
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                match line.split():
                    case [b"+", pgid, marker] if pgid.isdigit():
                        groups[int(pgid)] = marker.decode()
                    case [b"-", pgid] if pgid.isdigit():
                        groups.pop(int(pgid), None)
                    case [b"bye"]:
                        bye = True
        if run in ready:
            return bye


def _reap(groups: dict[int, str], token: str) -> None:
    from fleet.procs import RUN_MARKER, kill_by_env, kill_group  # psutil: only once the run died

    for pgid in groups:
        kill_group(pgid)
    kill_by_env(RUN_MARKER, *groups.values())  # what left its group, wherever it moved
    kill_by_env(TOKEN_VAR, token)


def main(args: list[str]) -> int:
    if len(args) != 2 or not args[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    run_pid, token = int(args[0]), args[1]
    groups: dict[int, str] = {}
    try:
        run = os.pidfd_open(run_pid)
    except ProcessLookupError:
        run = None
    # Unless the pid was reused (the run is gone); a run exiting by itself with no agent
    # left means nothing to kill and no process table to search (`fleet run`'s output ends
    # when this exits: it shares its stderr).
    if run is not None and os.getppid() == run_pid and _watch(run, groups) and not groups:
        return 0
    _reap(groups, token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
