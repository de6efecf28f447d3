"""The embedded defaults with real subprocesses: local executor and check-command gate."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import psutil
import pytest

from fleet.clients.local import LocalExecutor, LocalQualityGate, run_check
from fleet.errors import AgentFailed, ConfigError, DispatchError, DispatchTimeout, UnknownTask

PY = sys.executable


@pytest.fixture
def executor(tmp_path):
    ex = LocalExecutor(workdir=tmp_path / "exec", cwd=tmp_path)
    yield ex
    ex.stop_all()


async def test_output_is_captured_and_target_model_passed(executor):
    task = await executor.dispatch(
        [PY, "-c", "import os; print(os.environ['FLEET_TARGET'], os.environ['FLEET_MODEL'])"],
        target="mac4",
        model="codex",
    )
    assert (await executor.poll_and_retrieve(task, 10)).strip() == "mac4 codex"


async def test_ten_megabytes_of_output_do_not_deadlock(executor):
    task = await executor.spawn([PY, "-c", "import sys; sys.stdout.write('x' * 10_000_000)"])
    assert len(await executor.poll_and_retrieve(task, 30)) == 10_000_000


async def test_arguments_are_never_given_to_a_shell(executor, tmp_path):
    hostile = f"$(touch {tmp_path}/pwned); touch {tmp_path}/pwned2"
    task = await executor.spawn([PY, "-c", "import sys; print(sys.argv[1])", hostile])
    assert (await executor.poll_and_retrieve(task, 10)).strip() == hostile
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


async def test_failure_carries_exit_code_and_stderr_tail(executor):
    task = await executor.spawn(
        [PY, "-c", "import sys; sys.stderr.write('agent crashed: no token'); sys.exit(3)"]
    )
    with pytest.raises(AgentFailed, match="exited with code 3: agent crashed: no token"):
        await executor.poll_and_retrieve(task, 10)


async def test_missing_program_is_a_clear_error(executor):
    with pytest.raises(DispatchError, match="cannot start 'no-such-agent-binary'"):
        await executor.spawn(["no-such-agent-binary", "--version"])


async def test_timeout_kills_the_whole_process_tree(executor, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    task = await executor.spawn([PY, "-c", script])
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = int(pidfile.read_text())
    with pytest.raises(DispatchTimeout, match="still running after 0.5 s"):
        await executor.poll_and_retrieve(task, 0.5)
    assert (
        not psutil.pid_exists(grandchild)
        or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    )


# Starts a grandchild whose parent exits at once: it is no longer in the tree, only in the group.
ORPHAN = (
    "import subprocess, sys, time\n"
    "mid = subprocess.Popen([sys.executable, '-c', "
    "'import subprocess, sys; "
    'p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
    "print(p.pid, flush=True)'], stdout=subprocess.PIPE, text=True)\n"
    "open(sys.argv[1], 'w').write(mid.stdout.readline().strip())\n"
    "mid.wait()\n"
    "time.sleep(60)\n"
)


def wait_for_pid(pidfile) -> int:
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return int(pidfile.read_text())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_gate_check_timeout_kills_an_orphan_that_holds_the_output_pipe(tmp_path):
    pidfile = tmp_path / "orphan.pid"
    gate = LocalQualityGate({"app": ([PY, "-c", ORPHAN, str(pidfile)], tmp_path)}, timeout=1)
    started = time.monotonic()
    status = await gate.status("app")
    elapsed = time.monotonic() - started
    assert not status.is_passing and "timed out" in status.detail
    assert gone(wait_for_pid(pidfile))
    assert elapsed < 30, f"the check held on for {elapsed:.1f} s after its 1 s timeout"


ESCAPEE = (  # starts a grandchild in a session of its own: neither in the tree nor in the group
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "start_new_session=True)\n"
    "open(sys.argv[1], 'w').write(str(p.pid))\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize(
    "program", [ORPHAN, ESCAPEE], ids=["orphan-in-the-group", "left-the-session"]
)
async def test_timeout_kills_what_the_command_started_wherever_it_went(executor, tmp_path, program):
    pidfile = tmp_path / "grandchild.pid"
    task = await executor.spawn([PY, "-c", program, str(pidfile)])
    grandchild = wait_for_pid(pidfile)
    with pytest.raises(DispatchTimeout):
        await executor.poll_and_retrieve(task, 0.5)
    assert gone(grandchild)


async def test_unknown_task(executor):
    with pytest.raises(UnknownTask):
        await executor.poll_and_retrieve("nope", 1)


async def test_gate_reports_phase_cycle_and_passing(tmp_path):
    flag = tmp_path / "ok"
    gate = LocalQualityGate(
        {
            "app": (
                [PY, "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)"],
                tmp_path,
            )
        }
    )
    first = await gate.status("app")
    assert (first.phase, first.cycle, first.is_passing) == ("failing", 1, False)
    flag.touch()
    second = await gate.status("app")
    assert (second.phase, second.cycle, second.is_passing, second.score) == (
        "passing",
        2,
        True,
        1.0,
    )


async def test_gate_check_timeout_fails_the_check(tmp_path):
    gate = LocalQualityGate(
        {"app": ([PY, "-c", "import time; time.sleep(30)"], tmp_path)}, timeout=0.3
    )
    status = await gate.status("app")
    assert not status.is_passing and "timed out" in status.detail


async def test_gate_without_check_command_says_how_to_fix():
    with pytest.raises(ConfigError, match="add `check: \\[...\\]`"):
        await LocalQualityGate({}).status("app")


async def test_waiting_on_many_agents_holds_no_thread_per_agent(executor):
    import asyncio
    import threading

    tasks = [await executor.spawn([PY, "-c", "import time; time.sleep(1.5)"]) for _ in range(30)]
    before = threading.active_count()
    waits = asyncio.gather(*(executor.poll_and_retrieve(t, 30) for t in tasks))
    await asyncio.sleep(0.5)
    during = threading.active_count()
    assert await waits == [""] * 30
    assert during <= before + 1, f"{during - before} threads for 30 waiting agents"


CANARIES = {
    "GEMINI_API_KEY": "canary-gemini-7c1f",
    "FLEET_AURA_TOKEN": "canary-aura-7c1f",
    "FLEET_STORE_URL": "postgresql://fleet:canary-pw-7c1f@db.example:5432/fleet",
}


async def test_agents_and_checks_never_see_the_orchestrators_secrets(tmp_path, monkeypatch):
    """Issue 8: an `env` agent printed GEMINI_API_KEY, FLEET_AURA_TOKEN and the store URL."""
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    executor = LocalExecutor(workdir=tmp_path / "exec", env={"APP_MODE": "demo"})
    dump = [PY, "-c", "import os; print(sorted(os.environ.items()))"]
    agent = await executor.poll_and_retrieve(await executor.spawn(dump), 30)
    passed, check = await run_check(dump, None, 30)
    assert passed
    for text in (agent, check):
        assert "canary" not in text
    assert "'APP_MODE', 'demo'" in agent and "'PATH'," in agent


async def test_a_start_polls_no_agent_whose_exit_is_awaited(executor, monkeypatch):
    """A start reaps the finished children nobody waits for (fire-and-forget spawns); the
    agents whose stage awaits their exit are left to it. Polling every one at each start
    made a cohort's stage change O(N²) in process-table calls on the event loop."""
    sleepers = [await executor.spawn([PY, "-c", "import time; time.sleep(30)"]) for _ in range(5)]
    waits = [asyncio.create_task(executor.poll_and_retrieve(t, 60)) for t in sleepers]
    forgotten = await executor.spawn(["true"])
    await asyncio.sleep(0.2)  # the waits begin; `true` exits and waits to be reaped
    polled: list[int] = []
    poll = subprocess.Popen.poll

    def counted(proc):
        polled.append(proc.pid)
        return poll(proc)

    monkeypatch.setattr(subprocess.Popen, "poll", counted)
    await executor.dispatch([PY, "-c", "pass"], target="local", model="")
    monkeypatch.undo()
    pids = {executor._jobs[t].proc.pid for t in sleepers}
    assert not pids & set(polled)
    assert executor._jobs[forgotten].proc.returncode == 0  # reaped: no zombie left
    for wait in waits:
        wait.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
