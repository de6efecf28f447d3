"""Process manager with real children: crash → restart, crash loop → give up, memory → restart."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from fleet.clock import ManualClock
from fleet.supervisor.config import ProcessSpec
from fleet.supervisor.procman import BACKOFF, EXITED, GAVE_UP, RUNNING, STOPPED, ProcessManager

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]
CRASH = [sys.executable, "-c", "import sys; sys.exit(7)"]


def spec(name: str, command, **kw) -> ProcessSpec:
    return ProcessSpec(name=name, command=command, **kw)


def wait_exit(manager: ProcessManager, name: str) -> None:
    """Wait (real time, bounded) for the managed child to exit, so the next tick sees it."""
    manager.process(name).popen.wait(timeout=10)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_crashed_process_is_restarted_after_backoff(clock, tmp_path):
    manager = ProcessManager(
        [spec("mcp", CRASH, restart="on-failure", backoff={"initial_seconds": 2})],
        clock=clock,
        log_dir=tmp_path,
    )
    try:
        manager.tick()
        mcp = manager.process("mcp")
        assert mcp.state == RUNNING and mcp.pid
        wait_exit(manager, "mcp")
        manager.tick()
        assert mcp.state == BACKOFF and mcp.restarts == 1 and mcp.last_exit_code == 7
        assert mcp.reason.startswith("exited with code 7 after 0.0 s; restarting in 2 s")
        clock.advance(1.9)
        manager.tick()
        assert mcp.state == BACKOFF  # backoff not over yet
        clock.advance(0.2)
        manager.tick()
        assert mcp.state == RUNNING and manager.status()["mcp"]["restarts"] == 1
        # Second quick crash: the backoff doubles.
        wait_exit(manager, "mcp")
        manager.tick()
        assert mcp.reason.endswith("restarting in 4 s")
    finally:
        manager.stop_all()


def test_crash_loop_gives_up_after_the_restart_intensity(clock, tmp_path):
    crash_loop = spec(
        "agent",
        CRASH,
        restart="always",
        backoff={"initial_seconds": 1, "max_seconds": 1},
        intensity={"max_restarts": 5, "period_seconds": 60},
    )
    manager = ProcessManager([crash_loop], clock=clock, log_dir=tmp_path)
    agent = manager.process("agent")
    try:
        manager.tick()
        for _ in range(5):
            wait_exit(manager, "agent")
            manager.tick()
            assert agent.state == BACKOFF
            clock.advance(1)
            manager.tick()
            assert agent.state == RUNNING
        wait_exit(manager, "agent")
        manager.tick()
        assert agent.state == GAVE_UP and agent.restarts == 5
        assert agent.reason.startswith(
            "gave up: 5 restarts in 60 s (limit 5); last: exited with code 7"
        )
        assert not manager.healthy()
        clock.advance(120)
        manager.tick()
        assert agent.state == GAVE_UP and agent.pid is None  # stays down until an operator acts
    finally:
        manager.stop_all()


def test_restarts_outside_the_period_do_not_count(clock, tmp_path):
    manager = ProcessManager(
        [
            spec(
                "p",
                CRASH,
                restart="always",
                backoff={"initial_seconds": 1, "max_seconds": 1},
                intensity={"max_restarts": 1, "period_seconds": 10},
            )
        ],
        clock=clock,
    )
    p = manager.process("p")
    try:
        manager.tick()
        wait_exit(manager, "p")
        manager.tick()
        clock.advance(11)  # the first restart leaves the window
        manager.tick()
        wait_exit(manager, "p")
        manager.tick()
        assert p.state == BACKOFF and p.restarts == 2
    finally:
        manager.stop_all()


def test_policies_never_and_on_failure_leave_clean_exits_alone(clock):
    done = [sys.executable, "-c", "pass"]
    manager = ProcessManager(
        [spec("once", CRASH, restart="never"), spec("job", done, restart="on-failure")], clock=clock
    )
    manager.tick()
    wait_exit(manager, "once")
    wait_exit(manager, "job")
    manager.tick()
    assert manager.process("once").state == EXITED and manager.process("once").restarts == 0
    assert manager.process("job").state == EXITED
    assert "restart policy never" in manager.process("once").reason


def test_memory_limit_exceeded_restarts_the_process(clock, tmp_path):
    hog = [
        sys.executable,
        "-c",
        "import time, sys; b = b'x' * (80 * 1024 * 1024);"
        " print('ready', flush=True); time.sleep(30)",
    ]
    manager = ProcessManager(
        [spec("hog", hog, restart="always", health={"interval_seconds": 5, "max_memory_mb": 40})],
        clock=clock,
        log_dir=tmp_path,
    )
    hog_proc = manager.process("hog")
    try:
        manager.tick()
        first_pid = hog_proc.pid
        deadline = time.monotonic() + 10
        while (
            psutil.Process(first_pid).memory_info().rss < 80 * 1024 * 1024
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        clock.advance(4)
        manager.tick()
        assert hog_proc.pid == first_pid  # not sampled before the interval
        clock.advance(1)
        manager.tick()
        assert hog_proc.state == RUNNING and hog_proc.restarts == 1 and hog_proc.pid != first_pid
        assert (
            hog_proc.reason.startswith("restarted: memory ")
            and "over the limit of 40 MB" in hog_proc.reason
        )
        assert hog_proc.last_sample.memory_mb > 40
        assert (
            not psutil.pid_exists(first_pid)
            or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        manager.stop_all()


def test_stop_all_takes_down_the_whole_process_tree(clock):
    tree = [
        sys.executable,
        "-c",
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "print(child.pid, flush=True); time.sleep(30)",
    ]
    manager = ProcessManager(
        [spec("tree", tree, stop_timeout_seconds=2), spec("plain", SLEEPER)], clock=clock
    )
    manager.tick()
    root = psutil.Process(manager.process("tree").pid)
    deadline = time.monotonic() + 10
    while not root.children() and time.monotonic() < deadline:
        time.sleep(0.02)
    family = [root, *root.children(recursive=True)]
    assert len(family) == 2
    started = time.monotonic()
    manager.stop_all()
    assert time.monotonic() - started < 1.5  # TERM is enough: no wait for the 2 s kill timeout
    assert [
        p for p in family if _alive(p)
    ] == []  # the grandchild too (init may not have reaped it yet)
    assert {p["state"] for p in manager.status().values()} == {STOPPED}


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_cpu_limit_needs_consecutive_samples_then_restarts(clock):
    busy = [sys.executable, "-c", "while True: pass"]
    manager = ProcessManager(
        [
            spec(
                "spin",
                busy,
                restart="always",
                health={"interval_seconds": 1, "max_cpu_percent": 10, "cpu_samples": 2},
            )
        ],
        clock=clock,
    )
    spin = manager.process("spin")
    try:
        manager.tick()
        first_pid = spin.pid
        for expected_over in (
            0,
            1,
        ):  # psutil's first reading is 0 %; then one sample over the limit
            clock.advance(1)
            manager.tick()
            assert spin.pid == first_pid and spin.cpu_over == expected_over
            time.sleep(0.15)
        clock.advance(1)
        manager.tick()
        assert spin.pid != first_pid and spin.restarts == 1
        assert (
            spin.reason.startswith("restarted: cpu ")
            and "over the limit of 10% for 2 samples" in spin.reason
        )
    finally:
        manager.stop_all()
