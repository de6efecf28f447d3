"""Agents die with their run: `kill -9` of a process that started agents through the local
executor takes every agent down with it — the agent, its children, and a child that left the
process group (setsid) — within a second, with no next run needed (another host's standby
could not reach them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fleet.tether import main as tether_main
from tests.helpers import PY

# The agent: a child in its group, a grandchild that leaves it (setsid), then waits; each
# writes its pid. Runs with the agents' environment (the allowlist), so the paths are argv.
AGENT = """\
import os, subprocess, sys, time
pids = sys.argv[1]
def note(name):
    with open(os.path.join(pids, name), "w") as f:
        f.write(str(os.getpid()))
if len(sys.argv) > 2:
    note(sys.argv[2]); time.sleep(120); sys.exit()
note("agent")
subprocess.Popen([sys.executable, __file__, pids, "child"])
subprocess.Popen([sys.executable, __file__, pids, "escaped"], start_new_session=True)
time.sleep(120)
"""
# The run: starts two agents through the local executor, says so, then waits to be killed.
RUN = """\
import asyncio, sys
from pathlib import Path
from fleet.clients.local import LocalExecutor
async def main():
    ex = LocalExecutor(workdir=Path(sys.argv[1]) / "exec")
    for n in range(2):
        await ex.spawn([sys.executable, sys.argv[2], str(Path(sys.argv[1]) / f"pids{n}")])
    print("started", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""
NAMES = ("agent", "child", "escaped")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for init to reap it has ended
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float) -> float:
    started = time.monotonic()
    while not cond():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def test_kill_9_of_the_run_kills_its_agents_and_what_they_started(tmp_path: Path) -> None:
    agent, run = tmp_path / "agent.py", tmp_path / "run.py"
    agent.write_text(AGENT)
    run.write_text(RUN)
    dirs = [tmp_path / f"pids{n}" for n in range(2)]
    for d in dirs:
        d.mkdir()
    proc = subprocess.Popen(
        [PY, str(run), str(tmp_path), str(agent)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        wait_for(lambda: all((d / n).exists() for d in dirs for n in NAMES), 90)
        pids = [int((d / n).read_text()) for d in dirs for n in NAMES]
        assert all(alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    took = wait_for(lambda: not any(alive(p) for p in pids), 15)
    print(f"\nFIGURE kill -9 of the run: its 6 agent processes gone {took:.2f} s after")


def test_the_tether_passes_the_agents_exit_code_through() -> None:
    code = subprocess.run(
        [PY, "-m", "fleet.tether", str(os.getpid()), "m", "--", PY, "-c", "raise SystemExit(7)"]
    ).returncode
    assert code == 7


def test_a_tether_to_a_run_already_gone_starts_nothing(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    flag = tmp_path / "ran"
    assert tether_main([str(gone.pid), "m", "--", "touch", str(flag)]) == 137
    assert not flag.exists()
