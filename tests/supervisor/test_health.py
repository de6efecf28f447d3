"""Health checks on injected readings; the app rolled back when it breaches after a change."""

from __future__ import annotations

import os
import sys

from fleet.clock import ManualClock
from fleet.supervisor.config import APP_HEALTH, Health, load_config
from fleet.supervisor.health import HealthMonitor, Reading, TreeReader
from fleet.supervisor.runner import IDLE, RUNNING, Supervisor
from tests.supervisor.conftest import fingerprint, git

BREAK_QUIETLY = [sys.executable, "-c", "open('app.py','a').write('# leaks memory now\\n')"]


class Readings:
    """Injected psutil readings: what the next sample of the app's tree will say."""

    def __init__(self) -> None:
        self.memory_mb, self.cpu_percent = 100.0, 5.0
        self.pids: list[int] = []

    def __call__(self, pid: int) -> Reading:
        self.pids.append(pid)
        return Reading(self.memory_mb, self.cpu_percent, 1)


def test_the_seed_health_checks_are_the_app_default(tmp_path):
    assert (APP_HEALTH.interval_seconds, APP_HEALTH.max_memory_mb, APP_HEALTH.max_cpu_percent) == (
        5,
        4096,
        90,
    )
    config = tmp_path / "supervisor.yaml"
    config.write_text("app: {repo: ., command: [python3, app.py]}\n")
    app = load_config(config).app
    assert app.health == APP_HEALTH and app.keep_commits == 10


def test_monitor_samples_on_the_interval_and_needs_consecutive_cpu_samples():
    clock, readings = ManualClock(), Readings()
    monitor = HealthMonitor(
        Health(interval_seconds=5, max_memory_mb=4096, max_cpu_percent=90, cpu_samples=3), readings
    )
    monitor.start(clock.now())
    readings.cpu_percent = 95
    clock.advance(4.9)
    assert monitor.check(1, clock.now()) is None and readings.pids == []  # not due yet
    for expected in (1, 2):
        clock.advance(5)
        assert monitor.check(1, clock.now()) is None and monitor.cpu_over == expected
    clock.advance(5)
    assert monitor.check(1, clock.now()) == "cpu 95% over the limit of 90% for 3 samples"
    readings.cpu_percent, readings.memory_mb = 10, 5000
    clock.advance(5)
    assert monitor.check(1, clock.now()) == "memory 5000 MB over the limit of 4096 MB"
    assert monitor.last_sample.as_dict()["memory_mb"] == 5000


def test_tree_reader_reads_a_real_process():
    reading = TreeReader()(os.getpid())
    assert reading is not None and reading.memory_mb > 1 and reading.processes >= 1
    assert TreeReader()(2**22 + 12345) is None  # no such process


def make(repo, tmp_path, clock, readings) -> Supervisor:
    return Supervisor(
        repo,
        [sys.executable, "app.py"],
        protected=["ci/**"],
        patches_dir=tmp_path / "patches",
        min_runtime=10,
        clock=clock,
        health_reader=readings,
    )


def test_app_breaching_memory_after_a_change_is_rolled_back_even_past_min_runtime(repo, tmp_path):
    clock, readings = ManualClock(), Readings()
    sup = make(repo, tmp_path, clock, readings)
    before = fingerprint(repo)
    assert sup.apply_change(BREAK_QUIETLY).verdict.accepted
    pid = sup.start_app()
    try:
        clock.advance(10)
        assert (
            sup.poll_app().survived and sup.state == RUNNING
        )  # proven by min_runtime, still on probation
        readings.memory_mb = 5000
        clock.advance(5)
        outcome = sup.poll_app()
        assert readings.pids[-1] == pid
        assert not outcome.survived and outcome.rolled_back
        assert outcome.reason == (
            f"app memory 5000 MB over the limit of 4096 MB after 15.0 s; "
            f"rolled back to {before['head'][:12]}"
        )
        assert fingerprint(repo) == before and b"leaks memory" in outcome.patch_path.read_bytes()
        status = sup.status()
        assert (
            status["state"] == IDLE
            and status["consecutive_failures"] == 1
            and status["app"]["pid"] is None
        )
        assert status["health"]["memory_mb"] == 5000
    finally:
        sup.stop_app()


def test_a_breach_without_a_change_restarts_without_rolling_back(repo, tmp_path):
    clock, readings = ManualClock(), Readings()
    sup = make(repo, tmp_path, clock, readings)
    head = git(repo, "rev-parse", "HEAD")
    sup.start_app()
    try:
        clock.advance(10)
        assert sup.poll_app().survived
        readings.cpu_percent = 99
        outcomes = []
        for _ in range(3):
            clock.advance(5)
            outcomes.append(sup.poll_app())
        assert outcomes[:2] == [None, None]
        assert not outcomes[2].rolled_back and outcomes[2].reason.startswith(
            "app cpu 99% over the limit of 90%"
        )
        assert sup.consecutive_failures == 1 and git(repo, "rev-parse", "HEAD") == head
    finally:
        sup.stop_app()


def test_probation_ends_with_the_run(repo, tmp_path):
    clock, readings = ManualClock(), Readings()
    sup = make(repo, tmp_path, clock, readings)
    assert sup.apply_change(BREAK_QUIETLY).verdict.accepted
    changed = git(repo, "rev-parse", "HEAD")
    sup.start_app()
    clock.advance(10)
    assert sup.poll_app().survived
    sup.stop_app()
    sup.start_app()  # the second run of the change: a breach now is not the change's
    try:
        readings.memory_mb = 5000
        clock.advance(5)
        outcome = sup.poll_app()
        assert (
            outcome is not None
            and not outcome.rolled_back
            and git(repo, "rev-parse", "HEAD") == changed
        )
    finally:
        sup.stop_app()
