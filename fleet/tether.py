"""Agents die with their run: a tiny parent for one agent that SIGKILLs it when the run dies.

    python -m fleet.tether RUN_PID MARKER -- ARGV...

The local executor starts every agent through it (`tethered`). The tether leads the agent's
process group, starts ARGV in it and waits on two pidfds: the agent's and the run's. When the
run (the orchestrator process, by pid — not the thread that started it) exits in any way,
`kill -9` included, the tether SIGKILLs the whole group and every process carrying MARKER
(`kill_marked`: what left the group with setsid), then itself. Otherwise it exits with the
agent's code (128 + N when a signal N ended it), so the executor sees the agent's own result.

Only this host's processes can be reached this way; an agent on a gateway is the gateway's.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

USAGE = "usage: python -m fleet.tether RUN_PID MARKER -- ARGV..."


def tethered(argv: list[str], marker: str, run_pid: int | None = None) -> list[str]:
    """`argv` started through the tether to `run_pid` (this process by default)."""
    pid = os.getpid() if run_pid is None else run_pid
    return [sys.executable, "-m", "fleet.tether", str(pid), marker, "--", *argv]


def _die_with_run(agent: subprocess.Popen, marker: str) -> None:
    from fleet.procs import kill_marked  # psutil: imported only once the run has died

    agent.kill()
    kill_marked(marker)  # the agent's children, wherever they moved (the tether is spared)
    os.killpg(0, signal.SIGKILL)  # what is left of the group, the tether last


def main(args: list[str]) -> int:
    if len(args) < 4 or args[2] != "--" or not args[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    run_pid, marker, argv = int(args[0]), args[1], args[3:]
    try:
        run = os.pidfd_open(run_pid)
    except ProcessLookupError:
        return 137  # the run is already gone: start nothing
    if os.getppid() != run_pid:  # the pid was reused: the run died before we looked
        return 137
    try:
        agent = subprocess.Popen(argv)
    except OSError as exc:
        print(f"cannot start {argv[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    done = os.pidfd_open(agent.pid)
    while True:
        ready, _, _ = select.select([run, done], [], [])
        if run in ready:
            _die_with_run(agent, marker)
        if done in ready:
            code = agent.wait()
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
