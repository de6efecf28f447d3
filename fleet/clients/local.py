"""Embedded defaults: a local executor (Dispatcher) and a check-command quality gate."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fleet.agentenv import agent_env
from fleet.clients.base import Command, GateStatus
from fleet.clock import Clock, SystemClock
from fleet.errors import (
    AgentFailed,
    ConfigError,
    DispatchError,
    DispatchTimeout,
    QualityGateError,
    UnknownTask,
)
from fleet.procs import (
    app_run_env,
    arun_bounded,
    await_exit,
    describe_exit,
    kill_marked,
    marked_env,
    stop_process_tree,
)
from fleet.tether import TOKEN_VAR, process_reaper

log = logging.getLogger("fleet.local")
TAIL = 2000
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when a command is stopped


def _tail(path: Path, limit: int = TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class _Job:
    command: list[str]
    proc: subprocess.Popen
    out: Path
    err: Path
    marker: str  # RUN_MARKER of everything it started
    awaited: bool = False  # a stage awaits its exit (and reaps it)


class LocalExecutor:
    """Runs agent commands as local subprocesses (argv lists, never a shell).

    Output goes to files, not pipes, so a 10 MB answer cannot deadlock the child.
    `target` and `model` are passed to the command as FLEET_TARGET / FLEET_MODEL.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fleet-exec-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        self.env = env or {}
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    # The idempotency key is accepted and not needed: a local start is never sent twice.
    async def spawn(self, command: Command, idempotency_key: str | None = None) -> str:
        return await self.dispatch(command, target="local", model="")

    async def dispatch(
        self, command: Command, target: str, model: str, idempotency_key: str | None = None
    ) -> str:
        argv = [str(a) for a in command]
        if not argv:
            raise DispatchError("empty command: the fleet file must give a program to run")
        task_id = uuid.uuid4().hex[:12]
        out, err = self.workdir / f"{task_id}.out", self.workdir / f"{task_id}.err"
        # The allowlist (fleet/agentenv.py) plus the fleet file's `env:`: agents are the
        # untrusted code here, so no FLEET_* secret, token, API key or store URL reaches them.
        # The app run's marker too: the run taking the app after a crash stops this agent.
        env, marker = marked_env(
            {**agent_env(self.env), "FLEET_TARGET": target, "FLEET_MODEL": model, **app_run_env()}
        )
        _startable(argv[0], self.cwd, env.get("PATH"))
        # The reaper runs before the agent does: the agent (its process group, what it starts)
        # dies with this process, whatever kills it — no agent outlives its run to edit behind
        # the next one. Its token covers a kill between the start and the registration.
        reaper = process_reaper()
        env[TOKEN_VAR] = reaper.ensure()
        try:
            with out.open("wb") as fo, err.open("wb") as fe:
                proc = subprocess.Popen(
                    argv,
                    stdout=fo,
                    stderr=fe,
                    stdin=subprocess.DEVNULL,
                    cwd=self.cwd,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise DispatchError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        reaper.register(proc.pid, marker)
        with self._lock:
            # Reap finished children nobody waits for (fire-and-forget spawns) so they do not
            # linger as zombies; their output files stay until someone polls them. An agent
            # whose exit a stage awaits is reaped by that wait: polling all of them at every
            # start made a cohort's stage change O(N²) in process-table calls.
            for job in self._jobs.values():
                if not job.awaited:
                    _release(job)
            self._jobs[task_id] = _Job(argv, proc, out, err, marker)
        log.info("started %s on %s (pid %s): %s", task_id, target, proc.pid, argv[0])
        return task_id

    async def poll_and_retrieve(self, task_id: str, timeout: float) -> str:
        with self._lock:
            job = self._jobs.get(task_id)
            if job is not None:
                job.awaited = True
        if job is None:
            raise UnknownTask(f"local executor has no task {task_id!r} (it may have restarted)")
        try:
            code = await await_exit(job.proc, timeout)
            if code is None:
                await asyncio.to_thread(_stop, job)
                raise DispatchTimeout(
                    f"task {task_id} ({job.command[0]}) still running after {timeout:g} s; "
                    "its process tree was stopped"
                )
        except asyncio.CancelledError:
            # The stage was cancelled (its task timed out, the run was stopped): the agent
            # must not go on editing behind the run's back.
            await asyncio.shield(asyncio.to_thread(_stop, job))
            raise
        finally:
            with self._lock:
                self._jobs.pop(task_id, None)
            _release(job)
        output = job.out.read_bytes().decode(errors="replace")
        if code != 0:
            raise AgentFailed(
                f"task {task_id} ({job.command[0]}) {describe_exit(code)}: "
                f"{_tail(job.err) or _tail(job.out) or 'no output'}"
            )
        job.out.unlink(missing_ok=True)
        job.err.unlink(missing_ok=True)
        return output

    def stop_all(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.proc.poll() is None:
                _stop(job)


def _startable(program: str, cwd: Path | None, path: str | None) -> None:
    """Say plainly that a program cannot be started, before the reaper is started for it."""
    if os.sep in program:
        found = Path(cwd or ".", program)
        ok = found.is_file() and os.access(found, os.X_OK)
    else:
        ok = shutil.which(program, path=path) is not None
    if not ok:
        raise DispatchError(f"cannot start {program!r}: no such executable file")


def _stop(job: _Job) -> None:
    stop_process_tree(job.proc, KILL_GRACE)
    kill_marked(job.marker)  # what left the process group (setsid) too
    _release(job)


def _release(job: _Job) -> None:
    """Unregister a reaped agent: from then on its pid, the id of its group, may be reused."""
    if job.proc.poll() is not None:
        process_reaper().unregister(job.proc.pid)


async def run_check(command: Command, cwd: Path | None, timeout: float) -> tuple[bool, str]:
    """Run a check command; returns (passed, tail of its output). Timeouts fail the check.

    The one bounded runner (fleet/procs.py): output to a file, the exit awaited on a pidfd
    (no thread per waiting check), the whole tree stopped at the timeout or a cancellation.
    The check runs code the agents changed, so it gets the agents' environment.
    """
    argv = [str(a) for a in command]
    try:
        done = await arun_bounded(argv, cwd=cwd, env=agent_env(), timeout=timeout, tail_bytes=TAIL)
    except OSError as exc:
        raise QualityGateError(f"cannot run check {argv[0]!r}: {exc.strerror or exc}") from None
    if done.timed_out:
        return False, f"check timed out after {timeout:g} s"
    return done.returncode == 0, done.output_tail.strip()


class LocalQualityGate:
    """Hydra's local stand-in: an app passes when its configured check command exits 0."""

    def __init__(
        self,
        checks: Mapping[str, tuple[Command, Path | None]],
        timeout: float = 600,
        clock: Clock | None = None,
    ):
        self.checks = checks
        self.timeout = timeout
        self.clock = clock or SystemClock()
        self._cycles: dict[str, int] = {}

    async def status(self, app_id: str) -> GateStatus:
        if app_id not in self.checks:
            raise ConfigError(
                f"no check command for app {app_id!r}: add `check: [...]` to it in the fleet file"
            )
        command, cwd = self.checks[app_id]
        cycle = self._cycles[app_id] = self._cycles.get(app_id, 0) + 1
        passed, tail = await run_check(command, cwd, self.timeout)
        return GateStatus(
            phase="passing" if passed else "failing",
            cycle=cycle,
            is_passing=passed,
            score=1.0 if passed else 0.0,
            detail=None if passed else tail[-500:],
        )
