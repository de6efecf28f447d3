"""Run rules: a supervised app that dies within min_runtime after a change rolls the change back.

The loop of the seed (Metamorph's supervisor): snapshot → apply a change → start the app →
if it dies within `min_runtime` the change broke it: roll back to the snapshot taken before
the change; `max_failures` consecutive failures → emergency stop, and no further change is
applied until an operator calls `resume()`. A run that lasts past `min_runtime` proves the
current commit good and resets the counter. Any exit before `min_runtime`, even with code 0,
counts as broken ("process exits in < 10 seconds" in the seed); a clean exit after it is a
finished job. While it runs, the app's process tree is sampled every `health.interval_seconds`
(memory, CPU): a breach stops it and counts as a failure; in the first run after a change (its
probation) it also rolls the change back, even after min_runtime.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from fleet.clock import Clock, SystemClock
from fleet.errors import SupervisorStopped
from fleet.procs import describe_exit, run_bounded, stop_process_tree
from fleet.settings import get_settings
from fleet.supervisor.archive import KEEP_COMMITS
from fleet.supervisor.check import tail
from fleet.supervisor.config import APP_HEALTH, Health
from fleet.supervisor.guard import ChangeGuard, GuardVerdict, Snapshot
from fleet.supervisor.health import HealthMonitor, Reader

RUNNING, WATCHING, IDLE, EMERGENCY_STOP = "running", "watching", "idle", "emergency_stop"


@dataclass(frozen=True)
class RunOutcome:
    """How one start of the supervised app ended (or that it proved itself and keeps running)."""

    survived: bool  # ran past min_runtime (or exited 0): the current commit is good
    exit_code: int | None  # None while it keeps running
    runtime_seconds: float
    rolled_back: bool
    reason: str
    patch_path: Path | None = None


@dataclass(frozen=True)
class ChangeResult:
    """What `apply_change` did: the agent's exit and the guard's verdict."""

    agent_exit_code: int | None  # None = stopped at the timeout
    agent_output_tail: str
    verdict: GuardVerdict


class Supervisor:
    """Guards changes to one repo and runs its app under the run rules."""

    def __init__(
        self,
        repo: Path,
        command: Sequence[str],
        protected: Sequence[str] = (),
        check_command: Sequence[str] | None = None,
        *,
        min_runtime: float | None = None,
        max_failures: int | None = None,
        patches_dir: Path | None = None,
        check_timeout: float = 600,
        agent_timeout: float | None = None,
        stop_timeout: float = 5,
        poll_interval: float = 0.05,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        clock: Clock | None = None,
        keep_commits: int = KEEP_COMMITS,
        health: Health | None = APP_HEALTH,
        health_reader: Reader | None = None,
    ):
        settings = get_settings()
        self.clock = clock or SystemClock()
        self.guard = ChangeGuard(
            repo,
            protected,
            check_command,
            patches_dir,
            check_timeout,
            self.clock,
            keep_commits=keep_commits,
        )
        self.repo = self.guard.repo
        self.command = list(command)
        self.min_runtime = (
            settings.supervisor_min_runtime_seconds if min_runtime is None else min_runtime
        )
        self.max_failures = (
            settings.supervisor_max_failures if max_failures is None else max_failures
        )
        self.agent_timeout = agent_timeout
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.env = dict(env) if env is not None else None
        self.log_path = log_path
        self.state = IDLE
        self.reason = "not started"
        self.consecutive_failures = 0
        self.started_at = self.clock.now()
        self.last_verdict: GuardVerdict | None = None
        self.last_outcome: RunOutcome | None = None
        self._last_good: Snapshot | None = None  # the state the app last proved good on
        self._pending = False  # accepted changes not yet proven by a run
        # The state before the change this run is the first run of: a health breach returns to it.
        self._probation: Snapshot | None = None
        self.health = HealthMonitor(health, health_reader) if health is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_started: datetime | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------ changes

    def apply_change(
        self, agent_command: Sequence[str], timeout: float | None = None
    ) -> ChangeResult:
        """Run an agent command that edits the repo, guarded: kept if safe, undone otherwise.

        An accepted change is committed but unproven until the app survives a run: call
        `run_once()` (or let `run()` restart the app). Raises SupervisorStopped in emergency
        stop. A rejected change counts as a failure.
        """
        with self._lock:
            self._refuse_if_stopped()
            snap = self.guard.snapshot()
            if self._last_good is None:
                self._last_good = snap
            self.reason = "agent at work"
        code, tail = run_agent(
            list(agent_command), self.repo, timeout or self.agent_timeout, self.env
        )
        # Checks may take minutes: validate outside the lock so /status keeps answering.
        verdict = self.guard.validate(snap)
        with self._lock:
            self.last_verdict = verdict
            if verdict.accepted:
                self._pending = self._pending or verdict.head != snap.head
                self.reason = f"change accepted at {verdict.head[:12]}; not yet proven by a run"
            else:
                self._fail(f"change rejected: {verdict.reason}")
            return ChangeResult(code, tail, verdict)

    # ------------------------------------------------------------ runs

    def start_app(self) -> int:
        """Start the supervised command (stopping a previous run); returns its pid."""
        with self._lock:
            self._refuse_if_stopped()
            self.stop_app()
            if self._last_good is None:
                self._last_good = self.guard.snapshot()
            elif self.guard.current_head() != self._last_good.head:
                # Commits made elsewhere (`fleet supervise guard`, the EVOLVE stage) are unproven
                # too.
                self._pending = True
            try:
                with contextlib.ExitStack() as files:
                    log = None
                    if self.log_path:
                        self.log_path.parent.mkdir(parents=True, exist_ok=True)
                        log = files.enter_context(open(self.log_path, "ab"))
                    self._proc = subprocess.Popen(
                        self.command,
                        cwd=self.repo,
                        env=self.env,
                        stdin=subprocess.DEVNULL,
                        stdout=log or subprocess.DEVNULL,
                        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                        start_new_session=True,  # its own group: a stop takes the whole tree
                    )
            except OSError as exc:
                self._proc = None
                self._proc_started = self.clock.now()
                self._judge(
                    None, 0.0, f"could not start {self.command[0]!r}: {exc.strerror or exc}"
                )
                return -1
            self._proc_started = self.clock.now()
            self._probation = self._last_good if self._pending else None
            if self.health is not None:
                self.health.start(self._proc_started)
            self.state = WATCHING
            self.reason = f"watching the app for {self.min_runtime:g} s"
            return self._proc.pid

    def poll_app(self) -> RunOutcome | None:
        """Judge the current run by the clock: an outcome once it is decided, else None."""
        with self._lock:
            if self._proc is None or self._proc_started is None:
                return None
            code = self._proc.poll()
            now = self.clock.now()
            runtime = (now - self._proc_started).total_seconds()
            if self.state == WATCHING and (code is not None or runtime >= self.min_runtime):
                return self._judge(code, runtime)
            if code is not None:  # a proven run that ended later: restartable, not a failure
                self._proc = None
                self._probation = None
                self.state = IDLE
                self.reason = f"app exited with code {code} after {runtime:.1f} s"
                self.last_outcome = RunOutcome(True, code, runtime, False, self.reason)
                return self.last_outcome
            breach = self.health.check(self._proc.pid, now) if self.health is not None else None
            return self._breached(breach, runtime) if breach else None

    def run_once(self) -> RunOutcome:
        """Start the app and watch it until it is judged; a proven app is left running."""
        self.start_app()
        while True:
            outcome = (
                self.last_outcome
                if self._proc is None and self.state != WATCHING
                else self.poll_app()
            )
            if outcome is not None:
                return outcome
            self.clock.sleep(self.poll_interval)

    def run(self, until: Callable[[], bool] | None = None, restart_delay: float = 1.0) -> None:
        """Keep the app running under the run rules until `until()` is true or emergency stop.

        Each start is judged like `run_once`; an app that ended is started again after
        `restart_delay` seconds. `until` is checked between polls, so a stop never waits
        for min_runtime to pass.
        """
        until = until or (lambda: False)
        try:
            while not until() and self.state != EMERGENCY_STOP:
                if self._proc is None:
                    if self.last_outcome is not None:
                        self.clock.sleep(restart_delay)
                        if until():
                            break
                    self.start_app()
                else:
                    self.poll_app()
                self.clock.sleep(self.poll_interval)
        finally:
            self.stop_app()

    def stop_app(self) -> None:
        with self._lock:
            self._probation = None
            if self._proc is not None:
                stop_process_tree(self._proc, self.stop_timeout)
                self._proc = None
                if self.state != EMERGENCY_STOP:
                    self.state = IDLE

    def wait_for_exit(self, timeout: float) -> int | None:
        """Block up to `timeout` real seconds for the current run to end; its exit code or None."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def resume(self) -> None:
        """Operator action: leave emergency stop with the counter cleared."""
        with self._lock:
            self.state, self.consecutive_failures = IDLE, 0
            self.reason = "resumed by operator"

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        with self._lock:
            proc = self._proc
            pid = proc.pid if proc is not None and proc.poll() is None else None
            return {
                "state": self.state,
                "reason": self.reason,
                "repo": str(self.repo),
                "current_commit": self.guard.current_head(),
                "last_good_commit": self._last_good.head if self._last_good else None,
                "unproven_change": self._pending,
                "consecutive_failures": self.consecutive_failures,
                "max_failures": self.max_failures,
                "min_runtime_seconds": self.min_runtime,
                "uptime_seconds": round((self.clock.now() - self.started_at).total_seconds(), 3),
                "app": {
                    "command": self.command,
                    "pid": pid,
                    "running_seconds": (
                        round((self.clock.now() - self._proc_started).total_seconds(), 3)
                        if pid and self._proc_started
                        else None
                    ),
                },
                "health": (
                    self.health.last_sample.as_dict()
                    if self.health is not None and self.health.last_sample
                    else None
                ),
                "last_verdict": _verdict_dict(self.last_verdict),
                "last_run": _outcome_dict(self.last_outcome),
            }

    def healthy(self) -> bool:
        return self.state != EMERGENCY_STOP

    # ------------------------------------------------------------ rules

    def _judge(self, code: int | None, runtime: float, why: str | None = None) -> RunOutcome:
        if why is None and (code is None or (code == 0 and runtime >= self.min_runtime)):
            # Past min_runtime, still running or finished cleanly: the current state is good.
            # Any exit before it, even with code 0, counts as broken (the seed's rule).
            self.consecutive_failures = 0
            self._pending = False
            self._last_good = self.guard.snapshot()
            self.state = RUNNING if code is None else IDLE
            if code is not None:
                self._proc = None
            self.reason = (
                f"app proven after {runtime:.1f} s at {self._last_good.head[:12]}"
                if code is None
                else f"app finished cleanly after {runtime:.1f} s"
            )
            outcome = RunOutcome(True, code, runtime, False, self.reason)
        else:
            self._proc = None
            why = (
                why
                or f"app {describe_exit(code)} after {runtime:.2f} s"
                f" (minimum runtime {self.min_runtime:g} s)"
            )
            patch = None
            rolled_back = False
            if self._pending and self._last_good is not None:
                patch = self.guard.rollback(self._last_good, f"broke the app: {why}")
                self._pending = False
                rolled_back = True
                why += f"; rolled back to {self._last_good.head[:12]}"
            self.state = IDLE
            outcome = RunOutcome(False, code, runtime, rolled_back, why, patch)
            self._fail(why)
        self.last_outcome = outcome
        return outcome

    def _breached(self, breach: str, runtime: float) -> RunOutcome:
        """The app broke a health limit: stop it; in its probation, roll the change back."""
        assert self._proc is not None
        target = self._probation
        code = stop_process_tree(self._proc, self.stop_timeout)
        self._proc = None
        why = f"app {breach} after {runtime:.1f} s"
        patch = None
        if target is not None:
            patch = self.guard.rollback(target, f"broke the app: {why}")
            self._last_good, self._pending, self._probation = target, False, None
            why += f"; rolled back to {target.head[:12]}"
        self.state = IDLE
        outcome = RunOutcome(False, code, runtime, target is not None, why, patch)
        self.last_outcome = outcome
        self._fail(why)
        return outcome

    def _fail(self, why: str) -> None:
        self.consecutive_failures += 1
        self.reason = why
        if self.consecutive_failures >= self.max_failures:
            self.state = EMERGENCY_STOP
            self.reason = (
                f"emergency stop: {self.consecutive_failures} consecutive failures"
                f" (limit {self.max_failures}); last: {why}."
                " Fix the app or its agent, then resume the supervisor"
            )
            self.stop_app()
            if self._pending and self._last_good is not None:
                self.guard.rollback(self._last_good, "emergency stop")
                self._pending = False

    def _refuse_if_stopped(self) -> None:
        if self.state == EMERGENCY_STOP:
            raise SupervisorStopped(f"{self.repo}: {self.reason}")


# ---------------------------------------------------------------- process helpers


def run_agent(
    argv: list[str], repo: Path, timeout: float | None, env: Mapping[str, str] | None
) -> tuple[int | None, str]:
    """Run an agent command in the repo, in its own session; (exit code, None at timeout; tail).

    Whatever the agent left running, in its session or out of it, is stopped before this
    returns: it must not edit the repo behind the guard.
    """
    try:
        done = run_bounded(argv, cwd=repo, env=env, timeout=timeout)
    except OSError as exc:
        return 127, f"could not start {argv[0]!r}: {exc.strerror or exc}"
    return done.returncode, tail(done.output_tail)


def _verdict_dict(v: GuardVerdict | None) -> dict | None:
    if v is None:
        return None
    d = asdict(v)
    d["patch_path"] = str(v.patch_path) if v.patch_path else None
    return d


def _outcome_dict(o: RunOutcome | None) -> dict | None:
    if o is None:
        return None
    d = asdict(o)
    d["patch_path"] = str(o.patch_path) if o.patch_path else None
    d["runtime_seconds"] = round(o.runtime_seconds, 3)
    return d
