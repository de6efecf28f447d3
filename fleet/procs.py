"""Running a command within bounds (time, output kept) and stopping a child with all it started:
its tree, its process group, and (by an environment marker) the processes that left both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

# Every process a marked command starts inherits this variable: the ones that leave its
# process group (setsid, double fork) are still found, and stopped.
RUN_MARKER = "FLEET_SUPERVISOR_RUN"
# Every agent started for an app run carries that run's marker (recorded in the store), so the
# run that takes the app after a crash stops what the dead run left working on it.
APP_RUN_MARKER = "FLEET_APP_RUN"
# The marker of the app run starting agents in this context (None: no app run), set around a
# start (fleet/claim.py) and read by the local executor: the Dispatcher protocol stays as is.
current_app_run: ContextVar[str | None] = ContextVar("current_app_run", default=None)
TAIL_BYTES = 16 * 1024  # output kept from a bounded run: its end, where errors are
STOP_GRACE = 1.0  # seconds between SIGTERM and SIGKILL, and for reading what is left after a stop
_POLL = 0.05  # how often a run whose output pipe stays open checks whether the command exited
# A bounded command reads nothing, writes one stream, and leads a session of its own (so a stop
# reaches its whole process group).
_SPAWN: dict = dict(
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    start_new_session=True,
)


@dataclass(frozen=True)
class Finished:
    """How a bounded run ended: exit code (None when stopped at the timeout), the output's end."""

    returncode: int | None
    output_tail: str
    timed_out: bool
    duration: float


class _Tail:
    """The last `limit` bytes written, in bounded memory whatever the output's size."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * self.limit:  # trim in batches, not on every chunk
            del self.data[: -self.limit]

    def text(self) -> str:
        return bytes(self.data[-self.limit :]).decode(errors="replace")


def run_bounded(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    tail_bytes: int = TAIL_BYTES,
    grace: float = STOP_GRACE,
) -> Finished:
    """Run `argv` in a session of its own; nothing it started outlives the call.

    On the timeout (or an interrupt) the whole tree is stopped (SIGTERM, `grace`, SIGKILL);
    when the command exits, whatever it left behind (its group, and escapees found by
    RUN_MARKER) is killed. A process holding the output pipe never makes this wait past the
    timeout plus `grace`. Raises OSError when the command cannot be started.
    """
    marked, marker = marked_env(env)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    proc = subprocess.Popen(list(argv), cwd=cwd, env=marked, **_SPAWN)
    assert proc.stdout is not None
    tail = _Tail(tail_bytes)
    with proc.stdout, selectors.DefaultSelector() as sel:
        fd = proc.stdout.fileno()
        sel.register(fd, selectors.EVENT_READ)
        open_pipe = True
        try:
            while not (timed_out := deadline is not None and time.monotonic() >= deadline):
                wait = (
                    _POLL if deadline is None else min(_POLL, max(0.0, deadline - time.monotonic()))
                )
                if not open_pipe:
                    time.sleep(wait)
                elif sel.select(wait):
                    chunk = os.read(fd, 65536)
                    if chunk:
                        tail.add(chunk)
                    else:  # EOF: every writer is gone
                        sel.unregister(fd)
                        open_pipe = False
                if _exited(proc):
                    break  # anything still holding the pipe is a leftover, stopped below
        except BaseException:
            _end(proc.pid, proc.poll, marker, grace, running=True)
            raise
        # Before reaping the child: until then its pid still names our process group.
        _end(proc.pid, proc.poll, marker, grace, running=timed_out)
        if open_pipe:  # the rest of the output, unless a process out of reach still holds the pipe
            _drain(sel, fd, tail, time.monotonic() + grace)
    code = proc.wait()
    return Finished(None if timed_out else code, tail.text(), timed_out, time.monotonic() - started)


async def arun_bounded(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    tail_bytes: int = TAIL_BYTES,
    grace: float = STOP_GRACE,
) -> Finished:
    """`run_bounded` for an event loop: the same bounds and the same stop, holding no thread.

    The output goes to a temporary file (nothing has to read while the command runs, and a
    leftover holding it open cannot keep us waiting), and the exit is awaited on a pidfd
    (`await_exit`): a thousand waiting commands are a thousand coroutines. Cancelling it
    stops the command's tree before the cancellation goes on.
    """
    marked, marker = marked_env(env)
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=marked,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = await await_exit(proc, timeout)
        except BaseException:
            await asyncio.shield(_aend(proc, marker, grace, running=True))
            raise
        timed_out = code is None
        await _aend(proc, marker, grace, running=timed_out)
        tail = _file_tail(out, tail_bytes)
    return Finished(code, tail, timed_out, time.monotonic() - started)


def _file_tail(file: IO[bytes], limit: int) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - limit))
    return file.read(limit).decode(errors="replace")


async def await_exit(proc: subprocess.Popen, timeout: float | None) -> int | None:
    """The child's exit code once it exits, or None after `timeout` seconds (None: never).

    Waits on a pidfd registered with the event loop: no thread and no poll per waiting
    child, however many there are and however long they run.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # reaped meanwhile (ESRCH), or no pidfd on this kernel
        return await _polled_exit(proc, timeout)
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        return proc.poll()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()  # it has exited: this only reaps it


async def _polled_exit(proc: subprocess.Popen, timeout: float | None) -> int | None:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while proc.poll() is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
    return proc.returncode


def _end(pid: int, reap: Callable[[], object], marker: str, grace: float, running: bool) -> None:
    """Stop what a bounded command leaves: its whole tree gently (`running`), else its
    leftovers at once; then every process carrying its marker, wherever it moved."""
    _end_group(pid, reap, grace, running)
    kill_marked(marker)


def _end_group(pid: int, reap: Callable[[], object], grace: float, running: bool) -> None:
    if running:
        _stop_tree(pid, reap, grace)
    else:
        _signal_group(pid, signal.SIGKILL)


async def _aend(proc: subprocess.Popen, marker: str, grace: float, running: bool) -> None:
    """`_end` from a coroutine: the group off the loop only when a stop has to wait for it,
    the marker search shared with the commands ending at the same time."""
    if running:
        await asyncio.to_thread(_end_group, proc.pid, proc.poll, grace, True)
    else:
        _signal_group(proc.pid, signal.SIGKILL)
    await _sweep().kill(marker)


class _MarkerSweep:
    """One search of the process table for every marker asked for meanwhile.

    A search reads every process's environment (milliseconds with a few hundred processes),
    and after each bounded command there is one: a cohort's checks end together, so they
    share a search instead of queueing one each for the default thread pool. Callers wait
    until a search that began after their call is over, as with `kill_marked`.
    """

    def __init__(self) -> None:
        self.markers: set[str] = set()
        self.done: asyncio.Future[None] | None = None
        self.searching: asyncio.Task[None] | None = None

    async def kill(self, marker: str) -> None:
        self.markers.add(marker)
        if self.done is None:
            self.done = asyncio.get_running_loop().create_future()
        done = self.done
        if self.searching is None or self.searching.done():
            self.searching = asyncio.create_task(self._search())
        await asyncio.shield(done)

    async def _search(self) -> None:
        while self.markers:
            markers, done = self.markers, self.done
            self.markers, self.done = set(), None
            assert done is not None
            try:
                await asyncio.to_thread(kill_marked, *markers)
            except Exception as exc:  # psutil failing: every waiter hears it
                done.set_exception(exc)
            else:
                done.set_result(None)


_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _MarkerSweep] = (
    weakref.WeakKeyDictionary()
)


def _sweep() -> _MarkerSweep:
    loop = asyncio.get_running_loop()
    sweep = _sweeps.get(loop)
    if sweep is None:
        sweep = _sweeps[loop] = _MarkerSweep()
    return sweep


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child exited, without reaping it: its pid keeps naming our process group."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return proc.poll() is not None


def _drain(sel: selectors.BaseSelector, fd: int, tail: _Tail, until: float) -> None:
    while (left := until - time.monotonic()) > 0 and sel.select(left):
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        tail.add(chunk)


def stop_process_tree(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM the process group and tree, wait, then SIGKILL whatever survives.

    The child must lead its own group (`start_new_session=True`): a grandchild whose parent
    exited is no longer in the tree, but it is still in the group. Returns the exit code, or
    None if the child could not be reaped.
    """
    _stop_tree(proc.pid, proc.poll, timeout)
    try:
        return proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return None


def _stop_tree(pid: int, reap: Callable[[], object], timeout: float) -> None:
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        family = []
    _signal_group(pid, signal.SIGTERM)
    for p in family:  # children that left the group still get the signal
        with contextlib.suppress(psutil.Error):
            p.terminate()
    alive = _wait_gone(reap, family, timeout)
    _signal_group(pid, signal.SIGKILL)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _wait_gone(reap, alive, 1)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(
    reap: Callable[[], object], family: list[psutil.Process], timeout: float
) -> list[psutil.Process]:
    """Wait until every member exited; a zombie counts as gone (its parent, or init, reaps it)."""
    deadline = time.monotonic() + timeout
    while True:
        reap()  # reap our own child so it does not linger as a zombie
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


def describe_exit(code: int | None) -> str:
    """A process's end in the operator's words: 'exited with code 3', 'was killed by SIGKILL'."""
    if code is None:
        return "did not run"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def kill_group(pgid: int) -> None:
    """SIGKILL a process group (a child started with `start_new_session=True` leads one)."""
    _signal_group(pgid, signal.SIGKILL)


def app_run_env() -> dict[str, str]:
    """The app-run marker variable for an agent started now (empty outside an app run)."""
    marker = current_app_run.get()
    return {} if marker is None else {APP_RUN_MARKER: marker}


def marked_env(env: Mapping[str, str] | None) -> tuple[dict[str, str], str]:
    """`env` (None: ours) plus a fresh RUN_MARKER; returns the environment and the marker."""
    marker = uuid.uuid4().hex
    return {**(os.environ if env is None else env), RUN_MARKER: marker}, marker


def kill_marked(*markers: str, rounds: int = 20) -> None:
    """SIGKILL every process started with one of these runs' markers, wherever it moved.

    A mitigation: a process that execs itself with a scrubbed environment is not found.
    """
    kill_by_env(RUN_MARKER, *markers, rounds=rounds)


def kill_by_env(name: str, *values: str, rounds: int = 20) -> None:
    """SIGKILL every process whose environment sets `name` to one of `values` (none: no-op).

    Finds what a dead orchestrator left running: its agents carry its marker however they
    were reparented. Same limit as `kill_marked`: a scrubbed environment is not found.
    """
    wanted = set(values)
    if not wanted:
        return
    for _ in range(rounds):  # another pass for children forked while the last one killed
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(name) in wanted:
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
