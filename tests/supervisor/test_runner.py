"""Run rules with real processes: a change that crashes the app is rolled back; 5 in a row stop."""

from __future__ import annotations

import sys

import pytest

from fleet.clock import ManualClock
from fleet.errors import SupervisorStopped
from fleet.supervisor.runner import EMERGENCY_STOP, RUNNING, Supervisor
from tests.supervisor.conftest import escapee, fingerprint, git, gone

BREAK_APP = [sys.executable, "-c", "open('app.py','w').write('raise SystemExit(3)\\n')"]
TOUCH_PROTECTED = [sys.executable, "-c", "open('ci/protected.cfg','w').write('off\\n')"]
APP = [sys.executable, "app.py"]


def make(repo, tmp_path, **kw) -> Supervisor:
    kw.setdefault("min_runtime", 0.3)
    return Supervisor(
        repo, APP, protected=["ci/**"], patches_dir=tmp_path / "patches", poll_interval=0.02, **kw
    )


def test_change_that_crashes_the_app_within_min_runtime_is_rolled_back(repo, tmp_path):
    # A long min_runtime while the broken app starts, so a slow start on a loaded machine is still
    # "quick".
    sup = make(repo, tmp_path, min_runtime=30)
    before = fingerprint(repo)
    change = sup.apply_change(BREAK_APP)
    assert change.verdict.accepted and change.agent_exit_code == 0
    assert git(repo, "rev-parse", "HEAD") != before["head"]  # committed, not yet proven

    outcome = sup.run_once()
    assert not outcome.survived and outcome.rolled_back and outcome.exit_code == 3
    assert outcome.reason.startswith("app exited with code 3 after ")
    assert "rolled back to " + before["head"][:12] in outcome.reason
    assert fingerprint(repo) == before
    assert b"raise SystemExit(3)" in outcome.patch_path.read_bytes()
    assert sup.status()["consecutive_failures"] == 1

    # The rolled-back app runs past min_runtime: proven, counter reset, left running.
    sup.min_runtime = 0.3
    outcome = sup.run_once()
    try:
        assert outcome.survived and outcome.exit_code is None
        status = sup.status()
        assert status["state"] == RUNNING and status["consecutive_failures"] == 0
        assert status["app"]["pid"] and status["current_commit"] == before["head"]
    finally:
        sup.stop_app()
    assert sup.status()["app"]["pid"] is None


def test_change_that_makes_the_app_exit_cleanly_at_once_is_rolled_back_too(repo, tmp_path):
    """The seed's rule is 'the process exits in < 10 s', whatever its exit code."""
    sup = make(repo, tmp_path, min_runtime=30)
    before = fingerprint(repo)
    assert sup.apply_change(
        [sys.executable, "-c", "open('app.py','w').write('print(1)\\n')"]
    ).verdict.accepted
    outcome = sup.run_once()
    assert not outcome.survived and outcome.rolled_back and outcome.exit_code == 0
    assert outcome.reason.startswith("app exited with code 0 after ")
    assert fingerprint(repo) == before and sup.status()["consecutive_failures"] == 1


def test_five_broken_changes_in_a_row_trigger_emergency_stop(repo, tmp_path):
    # min_runtime is long: a crashing app is judged the moment it exits, a healthy one would not be.
    sup = make(repo, tmp_path, min_runtime=30)
    before = fingerprint(repo)
    for i in range(5):
        if i % 2:
            result = sup.apply_change(TOUCH_PROTECTED)  # rejected by the guard: a failure too
            assert not result.verdict.accepted
        else:
            assert sup.apply_change(BREAK_APP).verdict.accepted
            assert sup.run_once().rolled_back
        assert sup.consecutive_failures == i + 1
    status = sup.status()
    assert status["state"] == EMERGENCY_STOP and not sup.healthy()
    assert status["reason"].startswith(
        "emergency stop: 5 consecutive failures (limit 5); last: app exited with code 3"
    )
    with pytest.raises(SupervisorStopped, match="emergency stop"):
        sup.apply_change([sys.executable, "-c", "open('app.py','a').write('# more\\n')"])
    assert fingerprint(repo) == before  # nothing applied after the stop, everything rolled back
    with pytest.raises(SupervisorStopped):
        sup.run_once()
    sup.resume()
    assert sup.status()["state"] == "idle" and sup.consecutive_failures == 0


def test_min_runtime_is_judged_by_the_injected_clock(repo, tmp_path):
    clock = ManualClock()
    sup = make(repo, tmp_path, min_runtime=10, clock=clock)
    pid = sup.start_app()
    try:
        assert pid > 0
        clock.advance(9.9)
        assert sup.poll_app() is None  # still within min_runtime: undecided
        clock.advance(0.2)
        outcome = sup.poll_app()
        assert outcome.survived and outcome.runtime_seconds == pytest.approx(10.1)
        assert sup.state == RUNNING
    finally:
        sup.stop_app()

    assert sup.apply_change(BREAK_APP).verdict.accepted
    sup.start_app()
    assert sup.wait_for_exit(10) == 3
    clock.advance(9.9)  # died (real time) and the clock says it was within min_runtime
    outcome = sup.poll_app()
    assert not outcome.survived and outcome.rolled_back
    assert outcome.reason.startswith("app exited with code 3 after 9.90 s (minimum runtime 10 s)")


def test_agent_that_outlives_its_timeout_is_stopped_and_its_edit_judged(repo, tmp_path):
    sup = make(repo, tmp_path)
    slow = [
        sys.executable,
        "-c",
        "import time; open('notes.md','w').write('x');"
        " print('working', flush=True); time.sleep(30)",
    ]
    result = sup.apply_change(slow, timeout=1)
    assert result.agent_exit_code is None and result.agent_output_tail == "working"
    assert result.verdict.accepted and (repo / "notes.md").exists()


def test_commit_made_elsewhere_is_unproven_until_the_app_survives(repo, tmp_path):
    from fleet.supervisor.guard import ChangeGuard

    sup = make(repo, tmp_path, min_runtime=30)
    sup.start_app()  # baseline: the current commit becomes the last good state once judged
    sup.stop_app()
    good = git(repo, "rev-parse", "HEAD")
    # The EVOLVE stage guards a change on its own and commits it.
    guard = ChangeGuard(repo, ["ci/**"], patches_dir=tmp_path / "p")
    snap = guard.snapshot()
    (repo / "app.py").write_text("raise SystemExit(4)\n")
    assert guard.validate(snap).accepted
    outcome = sup.run_once()
    assert outcome.rolled_back and outcome.exit_code == 4
    assert git(repo, "rev-parse", "HEAD") == good


def test_process_that_left_the_agents_session_is_stopped_before_validation(repo, tmp_path):
    sup = make(repo, tmp_path)
    pidfile = tmp_path / "escapee.pid"
    result = sup.apply_change(escapee(pidfile))
    assert result.agent_exit_code == 0 and result.verdict.accepted
    assert gone(pidfile)  # it can no longer edit ci/protected.cfg behind the guard
