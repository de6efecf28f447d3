"""The work ledger: every agent try measured where the output is read (claim.run_once)."""

from __future__ import annotations

import json

import pytest

from fleet.errors import AgentFailed
from fleet.ledger import budget_left, current_cohort
from fleet.parsing import TASKS_END, TASKS_START
from fleet.pipeline import run_skill
from tests.helpers import app_run, demo_fleet, script

TASKS = [{"priority": p, "description": f"Fix thing number {p} in the app."} for p in (1, 2, 3)]


def skill_agent(tmp_path, report: str, fail_first: bool = False) -> list[str]:
    flag = tmp_path / "failed-once"
    body = (
        "import pathlib, sys\n"
        f"flag = pathlib.Path({str(flag)!r})\n"
        f"if {fail_first} and not flag.exists():\n"
        "    flag.write_text('x'); print('COST: $9'); sys.exit(3)\n"
        f"print({TASKS_START!r}); print({json.dumps({'tasks': TASKS})!r}); print({TASKS_END!r})\n"
        f"print({report!r})\n"
    )
    return [*script(tmp_path, "skill", body), "{repo}"]


async def test_each_try_is_recorded_with_the_agents_cost_report(tmp_path):
    report = "COST: $0.12\nTOKENS: in=1,000 out=250\nACCOUNT: team-max-2"
    run = app_run(tmp_path, demo_fleet(tmp_path, skill=skill_agent(tmp_path, report, True)))
    with pytest.raises(AgentFailed):
        await run_skill(run)
    token = current_cohort.set("cohort-7")
    try:
        await run_skill(run)
    finally:
        current_cohort.reset(token)
    [app] = run.store.work_totals("app")
    assert (app.key, app.tasks, app.attempts) == ("demo-calc", 1, 2)
    assert (app.tokens_in, app.tokens_out, app.cost_usd) == (1000, 250, 0.12)
    assert app.wall_seconds >= 0
    # The failed try's own output is not read: its cost stays unknown, not $9.
    runs = {t.key: (t.attempts, t.cost_usd) for t in run.store.work_totals("run")}
    assert runs == {"run-1": (1, None), "cohort-7": (1, 0.12)}
    accounts = {t.key: t.cost_usd for t in run.store.work_totals("account")}
    assert accounts == {"": None, "team-max-2": 0.12}


async def test_an_agent_that_reports_nothing_still_counts_time_and_tries(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path, skill=skill_agent(tmp_path, "done")))
    await run_skill(run)
    [app] = run.store.work_totals("app")
    assert (app.attempts, app.tokens_in, app.cost_usd) == (1, None, None)


def test_the_budget_stops_new_starts_once_spent():
    assert budget_left(4.99, 5.0) is None
    assert budget_left(100.0, None) is None
    assert budget_left(5.0, 5.0) == (
        "cohort budget spent: $5.00 of $5.00 (cohort_budget_usd); no new apps start, "
        "running apps finish — raise the budget or finish the cohort to go on"
    )
