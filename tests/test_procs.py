"""The bounded-process runner, real children: the timeout holds when an escapee keeps the pipe."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fleet.procs import Finished, arun_bounded, run_bounded


def run(flavour: str, argv: list[str], **kw) -> Finished:
    if flavour == "sync":
        return run_bounded(argv, **kw)
    return asyncio.run(arun_bounded(argv, **kw))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pidfile.exists() and pidfile.read_text().strip():
            return int(pidfile.read_text())
        time.sleep(0.01)
    raise AssertionError(f"no pid in {pidfile}")


def setsid_sleeper(pidfile: Path, then: str) -> list[str]:
    """A shell that leaves `setsid sleep 60` holding its stdout, then runs `then`."""
    return ["sh", "-c", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & echo started; {then}"]


def double_fork(pidfile: Path) -> list[str]:
    """A child that double-forks: the grandchild keeps stdout open, the child exits at once."""
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        f"while not os.path.exists({str(pidfile)!r}) or not open({str(pidfile)!r}).read():\n"
        "    time.sleep(0.01)\n"
        "print('parent done', flush=True)\n"
    )
    return [sys.executable, "-c", code]


FLAVOURS = ["sync", "async"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_exit_code_and_the_end_of_the_output(flavour):
    done = run(
        flavour,
        [sys.executable, "-c", "import sys; print('x' * 100000 + 'END'); sys.exit(3)"],
        tail_bytes=10,
    )
    assert done.returncode == 3 and not done.timed_out
    assert done.output_tail == "xxxxxxEND\n" and done.duration < 10


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_timeout_stops_a_command_whose_setsid_escapee_holds_the_pipe(flavour, tmp_path):
    pidfile = tmp_path / "escapee.pid"
    started = time.monotonic()
    done = run(flavour, setsid_sleeper(pidfile, "sleep 60"), timeout=1, grace=0.5)
    assert done.timed_out and done.returncode is None
    assert time.monotonic() - started < 1 + 0.5 + 3  # timeout + grace + slack for a loaded machine
    assert "started" in done.output_tail
    assert gone(wait_for_pid(pidfile))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_exit_does_not_wait_for_a_setsid_escapee_holding_the_pipe(flavour, tmp_path):
    pidfile = tmp_path / "escapee.pid"
    started = time.monotonic()
    done = run(
        flavour,
        setsid_sleeper(pidfile, f"while [ ! -s {pidfile} ]; do sleep 0.01; done"),
        timeout=30,
    )
    assert done.returncode == 0 and not done.timed_out
    assert time.monotonic() - started < 5  # not the escapee's 60 s, nor the 30 s timeout
    assert gone(wait_for_pid(pidfile))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_double_forked_grandchild_holding_the_pipe_is_stopped(flavour, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    started = time.monotonic()
    done = run(flavour, double_fork(pidfile), timeout=30)
    assert done.returncode == 0 and "parent done" in done.output_tail
    assert time.monotonic() - started < 5
    assert gone(wait_for_pid(pidfile))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_command_that_cannot_start_raises_oserror(flavour, tmp_path):
    with pytest.raises(OSError):
        run(flavour, [str(tmp_path / "no-such-program")])


def test_cancelling_the_async_run_stops_the_whole_tree(tmp_path):
    pidfile = tmp_path / "escapee.pid"

    async def cancel_once_started() -> None:
        task = asyncio.ensure_future(arun_bounded(setsid_sleeper(pidfile, "sleep 60"), timeout=60))
        while not (pidfile.exists() and pidfile.read_text().strip()):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(cancel_once_started())
    assert time.monotonic() - started < 10
    assert gone(wait_for_pid(pidfile))


def test_an_interrupted_sync_run_stops_the_whole_tree(tmp_path):
    pidfile = tmp_path / "escapee.pid"

    class Interrupted(Exception):
        pass

    def interrupt(*_: object) -> None:
        raise Interrupted

    def interrupt_once_started() -> None:
        wait_for_pid(pidfile)
        os.kill(os.getpid(), signal.SIGALRM)  # handled in the main thread, inside run_bounded

    previous = signal.signal(signal.SIGALRM, interrupt)
    threading.Thread(target=interrupt_once_started, daemon=True).start()
    try:
        with pytest.raises(Interrupted):
            run_bounded(setsid_sleeper(pidfile, "sleep 60"), timeout=60)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert gone(wait_for_pid(pidfile))


def test_waiting_async_runs_hold_no_thread_each():
    """The local gate's checks wait on a pidfd: twenty waiting commands add no thread."""
    import threading

    async def main() -> tuple[int, int, list[Finished]]:
        before = threading.active_count()
        sleeper = [sys.executable, "-c", "import time; time.sleep(3)"]
        runs = [asyncio.ensure_future(arun_bounded(sleeper, timeout=60)) for _ in range(20)]
        await asyncio.sleep(1)
        during = threading.active_count()
        return before, during, list(await asyncio.gather(*runs))

    before, during, results = asyncio.run(main())
    assert during == before
    assert [r.returncode for r in results] == [0] * 20


def test_commands_that_end_together_share_one_marker_search(tmp_path, monkeypatch):
    """Every command's escapees are found by its marker in the process table; twenty checks
    ending at once share a few searches of it instead of one each, and every escapee dies."""
    searches = []
    process_iter = psutil.process_iter

    def counted(*args, **kwargs):
        searches.append(time.monotonic())
        return process_iter(*args, **kwargs)

    monkeypatch.setattr(psutil, "process_iter", counted)
    pidfiles = [tmp_path / f"escapee{i}.pid" for i in range(20)]
    wait = "while [ ! -s {p} ]; do sleep 0.01; done"

    async def main() -> list[Finished]:
        runs = [arun_bounded(setsid_sleeper(p, wait.format(p=p)), timeout=30) for p in pidfiles]
        return list(await asyncio.gather(*runs))

    results = asyncio.run(main())
    assert [r.returncode for r in results] == [0] * 20
    assert all(gone(wait_for_pid(p)) for p in pidfiles)
    assert len(searches) < 20 / 2, f"{len(searches)} searches of the process table for 20 ends"
