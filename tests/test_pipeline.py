"""The seven stages as plain functions, on real git repos, subprocesses and SQLite (no Prefect)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from fleet.clients.base import GateStatus
from fleet.clock import ManualClock
from fleet.errors import QualityGateError, StageFailed, StaleLease
from fleet.models import Stage
from fleet.pipeline import (
    run_evolve,
    run_learn,
    run_review,
    run_ship,
    run_skill,
    wait_for_quality,
)
from tests.helpers import advance, app_run, demo_fleet, script


async def test_demo_app_goes_through_every_stage(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    tasks = await run_skill(run)
    assert len(tasks) >= 3 and all(t.source == "skill" for t in tasks)
    issues = await run_review(run, tasks)
    assert issues and all(t.source == "adversarial" and t.severity for t in issues)
    status = await run_evolve(run)
    assert status.is_passing
    await run_ship(run)
    assert run.state().stage is Stage.COMPLETE and run.shipped
    trajectory = await run_learn(run, "success")
    assert (trajectory.skill_tasks, trajectory.adversarial_issues) == (len(tasks), len(issues))
    assert trajectory.reward == 1.0 and set(trajectory.durations) == {
        "skill",
        "review",
        "evolve",
        "ship",
    }
    assert run.store.list_trajectories("demo-calc") == [trajectory]
    builds = list((tmp_path / "demo" / "repos" / "dist").glob("demo-calc-*.tar.gz"))
    assert len(builds) == 1


async def test_rerunning_an_unfinished_skill_stage_never_duplicates_tasks(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    first = await run_skill(run)
    # The crash case: tasks were upserted but the skillComplete write never happened.
    with run.store._tx() as db:
        db.execute("UPDATE app_evolution_states SET stage = 'skillRunning'")
    again = await run_skill(run)
    assert len(again) == len(first) == len(run.store.list_tasks("demo-calc", "skill"))


async def test_too_few_tasks_retries_once_with_the_explicit_prompt(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path), app_id="demo-weather")
    tasks = await run_skill(run)
    assert len(tasks) >= 3
    assert any("retried with the explicit prompt" in n for n in run.notes)
    assert run.state().error is None


async def test_still_too_few_tasks_fails_with_insufficient_tasks(tmp_path):
    calls = tmp_path / "calls"
    skill = script(
        tmp_path,
        "skill",
        f"import sys\nopen({str(calls)!r}, 'a').write(repr(sys.argv[2:]) + '\\n')\n"
        "print('Looked around; the app seems fine.')\n",
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, skill=[*skill, "{repo}", "{prompt}"]))
    with pytest.raises(StageFailed, match="insufficient_tasks: 0 task"):
        await run_skill(run)
    prompts = calls.read_text().splitlines()
    assert len(prompts) == 2 and "EVOLUTION_TASKS_START" in prompts[1]
    assert run.state().error == "insufficient_tasks"


async def test_review_goes_to_review_target_with_prior_tasks(tmp_path):
    seen = tmp_path / "seen.json"
    review = script(
        tmp_path,
        "review",
        "import json, os, sys\n"
        f"json.dump({{'target': os.environ['FLEET_TARGET'], 'model': os.environ['FLEET_MODEL'], "
        f"'prompt': sys.argv[1]}}, open({str(seen)!r}, 'w'))\n"
        "print('ISSUE FILE: a.py SEVERITY: critical FIX: Stop the crash.')\n",
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, review=[*review, "{prompt}"]))
    tasks = await run_skill(run)
    issues = await run_review(run, tasks)
    sent = json.loads(seen.read_text())
    assert (sent["target"], sent["model"]) == ("mac4", "codex")
    assert "Review app 'demo-calc'" in sent["prompt"] and tasks[0].description in sent["prompt"]
    assert [(i.file, i.severity, i.priority) for i in issues] == [("a.py", "critical", 1)]


async def test_ship_is_dispatched_to_the_ship_target(tmp_path):
    seen = tmp_path / "target"
    ship = script(
        tmp_path, "ship", f"import os\nopen({str(seen)!r}, 'w').write(os.environ['FLEET_TARGET'])\n"
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, ship=ship))
    advance(run, Stage.HYDRA_BUILD)
    await run_ship(run)
    assert seen.read_text() == "mac1" and run.state().stage is Stage.COMPLETE


def _remote_app(run):
    """An app without a local repo: EVOLVE spawns Hydra and only polls (the production path)."""
    run.app = run.app.model_copy(update={"repo": None})
    return run


async def test_hydra_hard_stop_after_four_hours(tmp_path):
    clock = ManualClock()
    never = script(tmp_path, "never", "import sys; sys.exit(1)\n")
    run = _remote_app(app_run(tmp_path, demo_fleet(tmp_path), clock=clock))
    run.gate.checks["demo-calc"] = (never, tmp_path)
    advance(run, Stage.ADVERSARIAL_COMPLETE)
    with pytest.raises(StageFailed, match="^Hydra timeout 4h$"):
        await run_evolve(run)
    assert sum(clock.sleeps) == 4 * 3600 and set(clock.sleeps) == {300}
    assert run.durations == {"evolve": 4 * 3600}  # a failed stage's time is reported too
    assert run.gate._cycles["demo-calc"] == 49  # a poll at t=0 and every 300 s up to 4 h


async def test_resumed_hydra_keeps_its_original_deadline(tmp_path):
    clock = ManualClock()
    never = script(tmp_path, "never", "import sys; sys.exit(1)\n")
    run = _remote_app(app_run(tmp_path, demo_fleet(tmp_path), clock=clock))
    run.gate.checks["demo-calc"] = (never, tmp_path)
    advance(run, Stage.HYDRA_BUILD)
    clock.advance(hours=3)  # the orchestrator crashed and came back 3 h later
    with pytest.raises(StageFailed, match="Hydra timeout 4h"):
        await run_evolve(run)
    assert sum(clock.sleeps) == 3600


async def test_resumed_past_the_hard_stop_fails_without_evolving_again(tmp_path):
    clock = ManualClock()
    evolved = tmp_path / "evolved"
    evolve = script(tmp_path, "evolve", f"open({str(evolved)!r}, 'w')\n")
    always = script(tmp_path, "always", "import sys; sys.exit(0)\n")
    run = app_run(tmp_path, demo_fleet(tmp_path, evolve=evolve), clock=clock)
    run.gate.checks["demo-calc"] = (always, tmp_path)
    advance(run, Stage.HYDRA_BUILD)
    clock.advance(hours=4, minutes=30)  # the orchestrator came back after the hard stop
    with pytest.raises(StageFailed, match="^Hydra timeout 4h$"):
        await run_evolve(run)
    assert (
        not evolved.exists() and "demo-calc" not in run.gate._cycles
    )  # a late pass would not count


class FlakyGate:
    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    async def status(self, app_id: str) -> GateStatus:
        self.calls += 1
        if self.calls <= self.failures:
            raise QualityGateError("hydra: connection refused")
        return GateStatus(phase="done", cycle=self.calls, is_passing=True, score=0.8)


async def test_gate_errors_are_missed_polls_not_verdicts():
    clock = ManualClock()
    gate = FlakyGate(failures=2)
    status = await wait_for_quality(gate, "a", clock, 300, clock.now() + timedelta(hours=4))
    assert status.is_passing and gate.calls == 3 and clock.sleeps == [300, 300]


async def test_a_newer_claim_fences_the_old_run(tmp_path):
    clock = ManualClock()
    run = app_run(tmp_path, demo_fleet(tmp_path), clock=clock)
    clock.advance(seconds=run.settings.app_lease_seconds + 1)
    assert run.store.claim_app("demo-calc", "other:2", "run-2", clock.now(), 60) is not None
    with pytest.raises(StaleLease):
        await run_skill(run)
    assert run.store.list_tasks("demo-calc") == []


def losing_agent(tmp_path, name: str, body: str) -> list[str]:
    """An agent in whose work the run loses the app: an operator's `fleet reset` lands mid-stage."""
    return script(
        tmp_path,
        name,
        "from datetime import datetime, timezone\nfrom fleet.store.sqlite import SQLiteStore\n"
        f"SQLiteStore({str(tmp_path / 'fleet.db')!r})"
        ".reset_app('demo-calc', datetime.now(timezone.utc))\n" + body,
    )


async def test_a_run_that_lost_the_app_mid_stage_writes_none_of_its_tasks(tmp_path):
    from fleet.parsing import TASKS_END, TASKS_START

    tasks = [
        {"priority": p, "description": f"Fix thing {p}.", "file": "calc.py"} for p in (1, 2, 3)
    ]
    skill = losing_agent(
        tmp_path, "skill", f"print({TASKS_START + json.dumps(tasks) + TASKS_END!r})\n"
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, skill=skill))
    with pytest.raises(StaleLease):
        await run_skill(run)
    assert run.store.list_tasks("demo-calc") == []


async def test_a_run_that_lost_the_app_does_not_ship(tmp_path):
    shipped = tmp_path / "shipped"
    run = app_run(
        tmp_path,
        demo_fleet(tmp_path, ship=script(tmp_path, "ship", f"open({str(shipped)!r}, 'w')\n")),
    )
    advance(run, Stage.HYDRA_BUILD)
    run.store.reset_app("demo-calc", run.clock.now())  # the app was taken back before SHIP
    with pytest.raises(StaleLease):
        await run_ship(run)
    assert not shipped.exists() and not run.shipped


@pytest.mark.parametrize("known", [False, True], ids=["hydra-never-heard-of-it", "hydra-running"])
async def test_resume_starts_hydra_only_when_it_has_no_status_for_the_app(tmp_path, known):
    """A crash between the hydraBuild write and the spawn: Hydra never heard of the app."""
    from fleet.clients.hydra import HydraGate
    from fleet.devservers import HydraDevServer

    clock = ManualClock()
    with HydraDevServer() as hydra:
        if known:
            hydra.set_status("demo-calc", phase="evolving", cycle=3)
        run = _remote_app(app_run(tmp_path, demo_fleet(tmp_path), clock=clock))
        run.gate = HydraGate(hydra.url, clock=clock, timeout=5)
        advance(run, Stage.HYDRA_BUILD)
        clock.advance(hours=3, minutes=59)  # back just before the hard stop
        try:
            with pytest.raises(StageFailed, match="Hydra timeout 4h"):
                await run_evolve(run)
        finally:
            run.gate.close()
            spawned = len(run.dispatcher._jobs)
            run.dispatcher.stop_all()
    assert spawned == (0 if known else 1)
    assert any("started it again" in n for n in run.notes) is not known


class NeverPassing:
    async def status(self, app_id: str) -> GateStatus:
        return GateStatus(phase="evolving", cycle=1)


async def test_many_apps_waiting_on_the_gate_hold_no_thread_each():
    import asyncio
    import threading

    from fleet.clock import SystemClock

    clock = SystemClock()
    before = threading.active_count()
    deadline = clock.now() + timedelta(seconds=0.5)
    waits = asyncio.gather(
        *(wait_for_quality(NeverPassing(), f"app{i}", clock, 0.01, deadline) for i in range(500))
    )
    await asyncio.sleep(0.2)
    during = threading.active_count()
    assert await waits == [None] * 500  # the deadline came first for every one
    assert during <= before  # threads other tests left may end meanwhile; none is added
