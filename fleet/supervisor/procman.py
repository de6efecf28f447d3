"""Keeps long-running helpers (MCP servers, node agents) alive: restarts, backoff, intensity, health

Non-blocking: `tick()` looks at every process once and acts (start, restart, give up, health
sample) by the injected clock; tests drive it, `run_forever()` calls it in a loop. Only a stop
blocks, for at most the process's stop_timeout.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from fleet.clock import Clock, SystemClock
from fleet.procs import describe_exit, stop_process_tree
from fleet.supervisor.config import ProcessSpec
from fleet.supervisor.health import HealthMonitor, HealthSample

# States of a managed process, in the operator's words.
STARTING_SOON, RUNNING, BACKOFF, EXITED, GAVE_UP, STOPPED, FAILED_TO_START = (
    "pending",
    "running",
    "backoff",
    "exited",
    "gave_up",
    "stopped",
    "failed_to_start",
)


@dataclass
class ManagedProcess:
    spec: ProcessSpec
    state: str = STARTING_SOON
    popen: subprocess.Popen | None = None
    started_at: datetime | None = None
    next_start_at: datetime | None = None
    restarts: int = 0
    restart_times: deque = field(default_factory=deque)
    delay: float = 0.0
    last_exit_code: int | None = None
    reason: str = ""
    monitor: HealthMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = HealthMonitor(self.spec.health)

    @property
    def last_sample(self) -> HealthSample | None:
        return self.monitor.last_sample

    @property
    def cpu_over(self) -> int:
        return self.monitor.cpu_over

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    def as_dict(self, now: datetime) -> dict:
        state = self.state
        if state == RUNNING and self.popen is not None and self.popen.poll() is not None:
            state = "exiting"  # exited; the next tick applies the restart policy
        return {
            "name": self.spec.name,
            "state": state,
            "pid": self.pid,
            "restarts": self.restarts,
            "reason": self.reason,
            "last_exit_code": self.last_exit_code,
            "running_seconds": round((now - self.started_at).total_seconds(), 3)
            if self.pid and self.started_at
            else None,
            "next_start_in_seconds": round((self.next_start_at - now).total_seconds(), 3)
            if self.state == BACKOFF and self.next_start_at
            else None,
            "last_health": self.last_sample.as_dict() if self.last_sample else None,
        }


class ProcessManager:
    """Starts, watches and restarts the configured processes; `tick()` does one round."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        clock: Clock | None = None,
        log_dir: Path | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ):
        self.clock = clock or SystemClock()
        self.log_dir = log_dir
        self.on_event = on_event or (lambda name, what: None)
        self.processes: dict[str, ManagedProcess] = {s.name: ManagedProcess(s) for s in specs}
        self.started_at = self.clock.now()
        self._lock = threading.RLock()
        self._stopping = False

    # ------------------------------------------------------------ the round

    def tick(self) -> None:
        """Look at every process once: reap exits, restart or give up, sample health."""
        with self._lock:
            if self._stopping:
                return
            now = self.clock.now()
            for proc in self.processes.values():
                self._tick_one(proc, now)

    def run_forever(self, interval: float = 0.5, until: Callable[[], bool] | None = None) -> None:
        until = until or (lambda: False)
        try:
            while not until():
                self.tick()
                self.clock.sleep(interval)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        """Stop every process tree (TERM the group, wait, KILL survivors)."""
        with self._lock:
            self._stopping = True
            for proc in self.processes.values():
                if proc.popen is not None:
                    stop_process_tree(proc.popen, proc.spec.stop_timeout_seconds)
                    proc.popen = None
                if proc.state not in (GAVE_UP,):
                    proc.state, proc.reason = STOPPED, "stopped by the supervisor"

    def process(self, name: str) -> ManagedProcess:
        return self.processes[name]

    def status(self) -> dict:
        with self._lock:
            now = self.clock.now()
            return {name: p.as_dict(now) for name, p in self.processes.items()}

    def healthy(self) -> bool:
        return not any(p.state in (GAVE_UP, FAILED_TO_START) for p in self.processes.values())

    # ------------------------------------------------------------ rules

    def _tick_one(self, proc: ManagedProcess, now: datetime) -> None:
        if proc.state == STARTING_SOON or (
            proc.state == BACKOFF and proc.next_start_at and now >= proc.next_start_at
        ):
            self._start(proc, now)
            return
        if proc.state != RUNNING or proc.popen is None:
            return
        code = proc.popen.poll()
        if code is not None:
            self._exited(proc, code, now)
            return
        breach = proc.monitor.check(proc.popen.pid, now)
        if breach:
            stop_process_tree(proc.popen, proc.spec.stop_timeout_seconds)
            proc.popen = None
            self._restart_or_give_up(proc, now, f"restarted: {breach}", immediate=True)

    def _exited(self, proc: ManagedProcess, code: int, now: datetime) -> None:
        proc.last_exit_code = code
        ran = (now - proc.started_at).total_seconds() if proc.started_at else 0.0
        if proc.popen is not None:
            stop_process_tree(proc.popen, 1)  # children it left behind go with it
        proc.popen = None
        how = describe_exit(code)
        policy = proc.spec.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            proc.state, proc.reason = EXITED, f"{how} after {ran:.1f} s; restart policy {policy}"
            self.on_event(proc.spec.name, proc.reason)
            return
        if ran >= proc.spec.backoff.reset_after_seconds:
            proc.delay = 0.0  # it had been healthy: the next restart is quick again
        self._restart_or_give_up(proc, now, f"{how} after {ran:.1f} s")

    def _restart_or_give_up(
        self, proc: ManagedProcess, now: datetime, why: str, immediate: bool = False
    ) -> None:
        window = proc.spec.intensity
        cutoff = now - timedelta(seconds=window.period_seconds)
        while proc.restart_times and proc.restart_times[0] <= cutoff:
            proc.restart_times.popleft()
        if len(proc.restart_times) >= window.max_restarts:
            proc.state = GAVE_UP
            proc.reason = (
                f"gave up: {len(proc.restart_times)} restarts in {window.period_seconds:g} s "
                f"(limit {window.max_restarts}); last: {why}"
            )
            self.on_event(proc.spec.name, proc.reason)
            return
        backoff = proc.spec.backoff
        proc.delay = (
            0.0
            if immediate
            else (
                backoff.initial_seconds
                if proc.delay <= 0
                else min(proc.delay * 2, backoff.max_seconds)
            )
        )
        proc.restart_times.append(now)
        proc.restarts += 1
        proc.state = BACKOFF
        proc.next_start_at = now + timedelta(seconds=proc.delay)
        proc.reason = f"{why}; restarting in {proc.delay:g} s" if proc.delay else why
        self.on_event(proc.spec.name, proc.reason)
        if proc.delay <= 0:
            self._start(proc, now)

    def _start(self, proc: ManagedProcess, now: datetime) -> None:
        spec = proc.spec
        env = {**os.environ, **spec.env} if spec.env else None
        log_path = spec.log_file or (self.log_dir / f"{spec.name}.log" if self.log_dir else None)
        try:
            with contextlib.ExitStack() as files:
                log = None
                if log_path:
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    log = files.enter_context(open(log_path, "ab"))
                proc.popen = subprocess.Popen(
                    spec.command,
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log or subprocess.DEVNULL,
                    stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: a stop takes the whole tree
                )
        except OSError as exc:
            proc.popen = None
            proc.state = FAILED_TO_START
            proc.reason = (
                f"could not start {spec.command[0]!r}: {exc.strerror or exc}; "
                "fix the command or cwd in the config"
            )
            self.on_event(spec.name, proc.reason)
            return
        proc.state = RUNNING
        proc.started_at = now
        proc.monitor.start(now)
