"""EVOLVE on a local repo: every agent attempt ends under the change guard, whatever it did."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest

from fleet.claim import AppRun, start_once, take
from fleet.clients.local import LocalExecutor
from fleet.clock import ManualClock
from fleet.errors import AgentFailed, StageFailed, StaleLease
from fleet.evolve import GUARDED, SNAPSHOT, guard_for, guarded_evolve, pre_attempt_snapshot
from fleet.models import Stage
from fleet.settings import FleetSettings
from fleet.supervisor.snapshot import dump_snapshot, load_snapshot
from tests.helpers import advance, app_run, demo_fleet, run_components, script


async def test_agent_that_fails_after_editing_a_protected_path_is_rolled_back(tmp_path):
    agent = script(
        tmp_path,
        "evolve_then_fail",
        (
            "import sys\n"
            "repo = sys.argv[1]\n"
            "open(repo + '/ci/protected.cfg', 'a').write('checks = off\\n')\n"
            "open(repo + '/app/calc.py', 'a').write('# half done\\n')\n"
            "sys.exit('gave up half way')\n"
        ),
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, evolve=[*agent, "{repo}"]))
    advance(run, Stage.HYDRA_BUILD)
    repo = run.app.repo
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout

    with pytest.raises(AgentFailed, match="gave up half way"):
        await guarded_evolve(run)

    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
    ).stdout
    assert status == ""  # neither edit survives to become the next snapshot's baseline
    assert (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout
        == head
    )
    patches = list((run.settings.home / "patches" / run.app.id).glob("*.patch"))
    assert len(patches) == 1 and "+checks = off" in patches[0].read_text()


async def test_a_run_that_lost_the_app_while_its_agent_worked_commits_nothing(tmp_path):
    agent = script(
        tmp_path,
        "evolve_while_reset",
        (
            "import sys\n"
            "from datetime import datetime, timezone\n"
            "from fleet.store.sqlite import SQLiteStore\n"
            "open(sys.argv[1] + '/app/calc.py', 'a').write('# a fine change\\n')\n"
            f"SQLiteStore({str(tmp_path / 'fleet.db')!r})"
            ".reset_app('demo-calc', datetime.now(timezone.utc))\n"
        ),
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, evolve=[*agent, "{repo}"]))
    advance(run, Stage.HYDRA_BUILD)
    repo = run.app.repo
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout

    with pytest.raises(StaleLease):
        await guarded_evolve(run)

    assert (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout
        == head
    )
    assert (
        subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
        ).stdout
        == ""
    )


def git_out(repo, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout


async def test_a_recorded_snapshot_reads_back_whole(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    repo = run.app.repo
    (repo / "app" / "calc.py").write_text("# uncommitted work\n")
    taken = await pre_attempt_snapshot(run, guard_for(run), 1)

    recorded = run.store.get_effect(run.app_id, run.effect_key(SNAPSHOT, 1))
    assert recorded is not None and recorded.kind == "snapshot"
    back = load_snapshot(recorded.value)
    assert back == taken and taken.stash is not None
    for part in ("perms", "internals", "ignored", "ignored_paths", "archive_ref"):
        assert getattr(back, part) == getattr(taken, part), part
    assert load_snapshot(dump_snapshot(back)) == back


async def test_a_resumed_evolve_validates_against_the_snapshot_recorded_before_the_crash(
    tmp_path,
):
    """demo-notes' bug: the dead run's agent edited a protected path after the orchestrator
    was killed; the resumed run must not take the edited repo as its baseline."""
    benign = script(
        tmp_path,
        "benign",
        "import sys\nopen(sys.argv[1] + '/app/calc.py', 'a').write('# a fine change\\n')\n",
    )
    late = script(
        tmp_path,
        "late_edit",
        (
            "import sys, time\n"
            "time.sleep(0.3)\n"  # still working when the orchestrator dies
            "open(sys.argv[1] + '/ci/protected.cfg', 'a').write('checks = off\\n')\n"
            "open(sys.argv[1] + '/done', 'w').write('')\n"
        ),
    )
    clock = ManualClock()
    settings = FleetSettings(home=tmp_path / "home", hydra_poll_seconds=300, evolve_attempts=1)
    fleet = demo_fleet(tmp_path, evolve=[*benign, "{repo}"])
    dead = app_run(tmp_path, fleet, clock=clock, settings=settings)
    advance(dead, Stage.HYDRA_BUILD)
    repo = dead.app.repo
    protected_before = (repo / "ci" / "protected.cfg").read_text()
    head = git_out(repo, "rev-parse", "HEAD")
    # The dead run: attempt 1's snapshot recorded, its agent started, then kill -9.
    await pre_attempt_snapshot(dead, guard_for(dead), 1)

    executor = dead.dispatcher

    async def start(key: str) -> str:
        return await executor.spawn([*late, str(repo)], idempotency_key=key)

    await start_once(dead, "evolve", 1, "spawn", start)
    # A new process: its executor knows no task.
    comp = run_components(dead, LocalExecutor(workdir=tmp_path / "exec-2"))
    del dead  # killed -9: nothing stops its agent
    deadline = time.monotonic() + 10
    while not (repo / "done").exists():  # the edit lands after the crash, before the resume
        assert time.monotonic() < deadline, "the dead run's agent never edited"
        time.sleep(0.02)
    (repo / "done").unlink()
    clock.advance(settings.app_lease_seconds + 1)
    resumed = take(comp, "demo-calc", "run-2")
    assert isinstance(resumed, AppRun)

    with pytest.raises(StageFailed, match="protected path changed: ci/protected.cfg"):
        await guarded_evolve(resumed)

    assert (repo / "ci" / "protected.cfg").read_text() == protected_before
    assert git_out(repo, "rev-parse", "HEAD") == head  # nothing accepted, nothing to ship
    assert git_out(repo, "status", "--porcelain") == ""
    assert resumed.store.get_effect("demo-calc", resumed.effect_key(GUARDED, 1)) is None


async def test_a_dead_runs_evolve_agent_is_stopped_before_its_late_edit_lands(tmp_path):
    """The crash as it happened: the dead run's agent is still working when the next run
    takes the app; it is killed then, so its protected-path edit never lands."""
    slow = script(
        tmp_path,
        "slow_edit",
        (
            "import os, sys, time\n"
            "open(sys.argv[1] + '/started', 'w').write(str(os.getpid()))\n"
            "time.sleep(2)\n"
            "open(sys.argv[1] + '/ci/protected.cfg', 'a').write('checks = off\\n')\n"
        ),
    )
    clock = ManualClock()
    settings = FleetSettings(home=tmp_path / "home", hydra_poll_seconds=300, evolve_attempts=1)
    dead = app_run(tmp_path, demo_fleet(tmp_path), clock=clock, settings=settings)
    advance(dead, Stage.HYDRA_BUILD)
    repo = dead.app.repo
    protected_before = (repo / "ci" / "protected.cfg").read_text()
    await pre_attempt_snapshot(dead, guard_for(dead), 1)
    executor = dead.dispatcher

    async def start(key: str) -> str:
        return await executor.spawn([*slow, str(repo)], idempotency_key=key)

    await start_once(dead, "evolve", 1, "spawn", start)
    deadline = time.monotonic() + 10
    while not (repo / "started").exists() or not (repo / "started").read_text():
        assert time.monotonic() < deadline, "the dead run's agent never started"
        time.sleep(0.02)
    pid = int((repo / "started").read_text())
    (repo / "started").unlink()
    comp = run_components(dead, LocalExecutor(workdir=tmp_path / "exec-2"))
    del dead  # killed -9: nothing stops its agent
    clock.advance(settings.app_lease_seconds + 1)

    assert isinstance(take(comp, "demo-calc", "run-2"), AppRun)

    try:
        os.kill(pid, 0)
        gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        gone = True
    assert gone
    time.sleep(2.5)  # past the moment the agent would have edited
    assert (repo / "ci" / "protected.cfg").read_text() == protected_before
