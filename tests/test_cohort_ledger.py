"""The ledger in a cohort: costs attributed to the cohort run, in its table artifact, and
the cohort budget that stops new starts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleet.settings import FleetSettings, get_settings
from fleet.store.base import WorkEntry
from fleet.store.sqlite import SQLiteStore
from fleet.wiring import components, reset_components
from tests.helpers import demo_fleet, script

ROOT = Path(__file__).resolve().parents[1]
AGENT = str(ROOT / "examples" / "demo" / "agent.py")


def reporting_skill(tmp_path: Path, cost: str) -> list[str]:
    """The demo skill, followed by the agent's own cost report."""
    body = (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, {AGENT!r}, 'skill', *sys.argv[1:]], check=True)\n"
        f"print('COST: ${cost}'); print('TOKENS: in=1000 out=100')\n"
    )
    return [*script(tmp_path, "skill_cost", body), "{repo}", "{prompt}"]


def spent(store: SQLiteStore, dollars: float, try_id: str = "earlier") -> None:
    store.record_work(
        WorkEntry(
            id=try_id,
            app_id="demo-calc",
            run_id="an-earlier-run",
            stage="skill",
            task_key="skill/1/x",
            outcome="answered",
            wall_seconds=1,
            cost_usd=dollars,
            recorded_at=datetime.now(UTC),
        )
    )


def test_a_spent_budget_starts_no_app_and_says_why(tmp_path):
    from flows.cohort import discover

    reset_components()
    settings = FleetSettings(
        home=tmp_path / "home", store_url=f"sqlite:///{tmp_path}/f.db", cohort_budget_usd=0.5
    )
    comp = components(settings, demo_fleet(tmp_path))
    try:
        spent(comp.store, 0.25)
        assert len(discover(comp, 3, False, False).start) == 3  # under budget
        spent(comp.store, 0.5)  # the same try recorded again adds nothing
        assert len(discover(comp, 3, False, False).start) == 3
        spent(comp.store, 0.25, "more")
        plan = discover(comp, 3, False, False)
        assert plan.start == []
        assert set(plan.skipped.values()) == {"waiting (cohort budget spent)"}
        assert plan.budget_spent is not None and "$0.50 of $0.50" in plan.budget_spent
    finally:
        reset_components()


@pytest.mark.usefixtures("prefect_harness")
async def test_the_cohort_table_shows_each_apps_tries_and_cost(tmp_path, monkeypatch, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.cohort import fleet_cohort

    db = tmp_path / "fleet.db"
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEET_STORE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("FLEET_COHORT_BUDGET_USD", "0.05")
    monkeypatch.setenv("FLEET_MAX_CONCURRENT", "1")
    get_settings.cache_clear()
    reset_components()
    try:
        path = demo_fleet(tmp_path, skill=reporting_skill(tmp_path, "0.05"))
        rows = await fleet_cohort(fleet_file=str(path), size=3)
        [done] = [r.app for r in rows if r.stage == "complete"]
        assert (
            sorted(r.note or "" for r in rows if r.app != done)
            == ["waiting (max_concurrent=1)"] * 2
        )
        store = SQLiteStore(db)
        [cohort] = store.work_totals("run")  # every try is the cohort run's
        reports = 2 if done == "demo-weather" else 1  # its skill is asked twice
        assert cohort.cost_usd == pytest.approx(0.05 * reports)
        assert cohort.tokens_in == 1000 * reports and cohort.attempts >= 3
        async with get_client() as client:
            [artifact] = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fleet-cohort"])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
        assert f"${0.05 * reports:.4f}" in (artifact.description or "")
        data = artifact.data
        table = {r["app"]: r for r in (json.loads(data) if isinstance(data, str) else data)}
        assert table[done]["cost_usd"] == f"{0.05 * reports:.4f}"
        assert table[done]["tokens"] == f"in={1000 * reports} out={100 * reports}"
        assert all(table[a]["agent_tries"] == 0 for a in table if a != done)

        # The cohort is still open (two apps wait) and its budget is spent: nothing starts.
        caplog.set_level("WARNING")
        again = await fleet_cohort(fleet_file=str(path), size=3)
        assert (
            sorted(r.note or "" for r in again if r.app != done)
            == ["waiting (cohort budget spent)"] * 2
        )
        assert "cohort budget spent" in caplog.text
    finally:
        reset_components()
        get_settings.cache_clear()
