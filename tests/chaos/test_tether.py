"""Agents die with their run: `kill -9` of a process that started agents through the local
executor takes every agent down with it — the agent, its children, and a child that left the
process group (setsid) — within a second, with no next run needed (another host's standby
could not reach them). One reaper per process does it (fleet/tether.py), told of each agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fleet.clients.local import LocalExecutor
from fleet.errors import AgentFailed
from fleet.tether import TOKEN_VAR, process_reaper
from fleet.tether import main as reaper_main
from tests.helpers import PY

# The agent: a child in its group, a child in its group with an empty environment (only the
# group reaches it), a grandchild that leaves the group (setsid), then waits; each writes its
# pid. Runs with the agents' environment (the allowlist), so the paths are argv.
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
subprocess.Popen([sys.executable, __file__, pids, "scrubbed"], env={})
subprocess.Popen([sys.executable, __file__, pids, "escaped"], start_new_session=True)
time.sleep(120)
"""
# The run: for each line `agent DIR` starts an agent through the local executor; for `stray DIR`
# a process carrying the reaper's token that the reaper is never told of. Says so, then waits.
RUN = """\
import asyncio, os, subprocess, sys
from pathlib import Path
from fleet.clients.local import LocalExecutor
from fleet.tether import TOKEN_VAR, process_reaper
async def main():
    ex = LocalExecutor(workdir=Path(sys.argv[1]) / "exec")
    for line in sys.stdin:
        what, pids = line.split()
        if what == "agent":
            await ex.spawn([sys.executable, sys.argv[2], pids])
        else:
            env = {**os.environ, TOKEN_VAR: process_reaper().ensure()}
            subprocess.Popen([sys.executable, sys.argv[2], pids, "stray"], env=env,
                             start_new_session=True)
        print("started", flush=True)
asyncio.run(main())
"""
NAMES = ("agent", "child", "scrubbed", "escaped")


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


def reapers(pid: int) -> list[int]:
    """The live reapers that process `pid` started."""
    found = []
    for p in psutil.Process(pid).children():
        try:
            if p.cmdline()[1:3] == ["-m", "fleet.tether"] and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


class Run:
    """A process that starts agents when told to, and is then `kill -9`ed."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "agent.py").write_text(AGENT)
        (tmp / "run.py").write_text(RUN)
        self.proc = subprocess.Popen(
            [PY, str(tmp / "run.py"), str(tmp), str(tmp / "agent.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self, what: str, names: tuple[str, ...] = NAMES) -> list[int]:
        """Start an agent (or a stray); the pids of its processes once they all run."""
        pids = self.tmp / uuid.uuid4().hex[:8]
        pids.mkdir()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{what} {pids}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "started"
        wait_for(lambda: all((pids / n).exists() and (pids / n).read_text() for n in names), 90)
        found = [int((pids / n).read_text()) for n in names]
        assert all(alive(p) for p in found)
        return found

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    started = Run(tmp_path)
    yield started
    started.kill()


def test_kill_9_of_the_run_kills_its_agents_and_what_they_started(run: Run) -> None:
    pids = run.start("agent") + run.start("agent")
    assert len(reapers(run.proc.pid)) == 1
    run.kill()
    took = wait_for(lambda: not any(alive(p) for p in pids), 15)
    print(f"\nFIGURE kill -9 of the run: its {len(pids)} agent processes gone {took:.2f} s after")


def test_a_reaper_killed_alone_is_replaced_and_the_new_one_kills_the_earlier_agents(
    run: Run,
) -> None:
    earlier = run.start("agent")
    [first] = reapers(run.proc.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not reapers(run.proc.pid), 5)
    later = run.start("agent")
    assert [p for p in reapers(run.proc.pid) if p != first]
    run.kill()
    # `scrubbed` carries neither marker nor token: only its registered group reaches it.
    wait_for(lambda: not any(alive(p) for p in earlier + later), 15)


def test_an_agent_never_registered_dies_with_the_run_by_the_token(run: Run) -> None:
    [stray] = run.start("stray", ("stray",))
    run.kill()
    wait_for(lambda: not alive(stray), 15)


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[LocalExecutor]:
    ex = LocalExecutor(workdir=tmp_path / "exec", cwd=tmp_path)
    yield ex
    ex.stop_all()


async def test_one_reaper_serves_every_agent_of_a_process(executor: LocalExecutor) -> None:
    for _ in range(5):
        await executor.spawn([PY, "-c", "import time; time.sleep(30)"])
    assert len(reapers(os.getpid())) == 1


@pytest.mark.parametrize(
    ("agent", "said"),
    [
        ("raise SystemExit(7)", "exited with code 7"),
        ("import os; os.kill(os.getpid(), 15)", "was killed by SIGTERM"),
    ],
)
async def test_the_agents_own_exit_reaches_the_executor(
    executor: LocalExecutor, agent: str, said: str
) -> None:
    task = await executor.spawn([PY, "-c", agent])
    with pytest.raises(AgentFailed, match=said):
        await executor.poll_and_retrieve(task, 10)


async def test_a_finished_agents_group_is_unregistered(executor: LocalExecutor) -> None:
    process_reaper().ensure()
    [reaper] = reapers(os.getpid())
    os.kill(reaper, signal.SIGSTOP)  # what the executor tells it stays in the pipe, for us to read
    try:
        task = await executor.spawn([PY, "-c", "pass"])
        await executor.poll_and_retrieve(task, 10)
        told = os.open(f"/proc/{reaper}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
        try:
            lines = os.read(told, 65536).decode().splitlines()
        finally:
            os.close(told)
    finally:
        os.kill(reaper, signal.SIGCONT)
    [(plus, pgid, _), (minus, unregistered)] = [line.split() for line in lines]
    assert (plus, minus, unregistered) == ("+", "-", pgid)


def test_a_reaper_whose_run_is_already_gone_kills_its_token_carriers() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    token = uuid.uuid4().hex
    carrier = subprocess.Popen(
        [PY, "-c", "import time; time.sleep(60)"], env={**os.environ, TOKEN_VAR: token}
    )
    try:
        assert reaper_main([str(gone.pid), token]) == 0
        assert carrier.wait(5) == -signal.SIGKILL
    finally:
        carrier.kill()


def test_a_run_that_says_bye_with_no_agent_left_has_nothing_searched() -> None:
    """`fleet run` ending by itself tells its reaper `bye`: with every agent unregistered the
    reaper exits at once (its stderr is the run's, so the run's output ends with it) and
    searches nothing; without the `bye` (the run was killed) it kills its token carriers."""
    token = uuid.uuid4().hex
    carrier = subprocess.Popen(
        [PY, "-c", "import time; time.sleep(60)"], env={**os.environ, TOKEN_VAR: token}
    )
    try:
        for said, survives in ((b"+ 4242 m\n- 4242\nbye\n", True), (b"", False)):
            reaper = subprocess.Popen(
                [PY, "-m", "fleet.tether", str(os.getpid()), token], stdin=subprocess.PIPE
            )
            reaper.communicate(said, timeout=10)
            assert reaper.returncode == 0
            assert (carrier.poll() is None) is survives
    finally:
        carrier.kill()


CLEAN_RUN = """\
import asyncio, os, subprocess, sys
from pathlib import Path
from fleet.clients.local import LocalExecutor
from fleet.tether import TOKEN_VAR, process_reaper
async def main():
    ex = LocalExecutor(workdir=Path(sys.argv[1]))
    await ex.poll_and_retrieve(await ex.spawn([sys.executable, "-c", "pass"]), 10)
    env = {**os.environ, TOKEN_VAR: process_reaper().ensure()}
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(stray.pid, flush=True)
asyncio.run(main())
"""


def test_a_run_exiting_by_itself_says_bye_to_its_reaper(tmp_path: Path) -> None:
    (tmp_path / "run.py").write_text(CLEAN_RUN)
    done = subprocess.run(
        [PY, str(tmp_path / "run.py"), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    stray = int(done.stdout.split()[0])
    try:
        # The output ended: the reaper is gone, and it searched nothing (the stray lives).
        assert alive(stray)
    finally:
        os.kill(stray, signal.SIGKILL)


def test_asking_for_the_process_reaper_makes_nothing_new() -> None:
    """The executor asks for it at every start and every reaped agent: 1 000 apps waiting on
    Hydra asked a million times, and each ask built (and kept, for atexit) a new Reaper."""
    import atexit

    first = process_reaper()
    before = atexit._ncallbacks()
    assert all(process_reaper() is first for _ in range(100))
    assert atexit._ncallbacks() == before
