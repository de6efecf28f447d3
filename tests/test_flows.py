"""The Prefect flows end to end on the embedded defaults, under one session-wide harness."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fleet.models import FleetConfig, Stage
from fleet.settings import get_settings
from fleet.store.sqlite import SQLiteStore
from fleet.wiring import reset_components
from tests.helpers import PY, demo_fleet, script

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]
AGENT = str(ROOT / "examples" / "demo" / "agent.py")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private store and home per test; components rebuilt from them."""
    db = tmp_path / "fleet.db"
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEET_STORE_URL", f"sqlite:///{db}")
    get_settings.cache_clear()
    reset_components()
    yield db
    reset_components()
    get_settings.cache_clear()


def counting(tmp_path: Path, mode: str) -> list[str]:
    """The demo agent's `mode`, logging each invocation to <tmp>/<mode>.calls."""
    return script(
        tmp_path,
        f"count_{mode}",
        (
            "import os, sys\n"
            f"open({str(tmp_path / (mode + '.calls'))!r}, 'a').write(sys.argv[1] + '\\n')\n"
            f"os.execv(sys.executable, [sys.executable, {AGENT!r}, {mode!r}, *sys.argv[1:]])\n"
        ),
    )


def calls(tmp_path: Path, mode: str) -> list[str]:
    path = tmp_path / f"{mode}.calls"
    return path.read_text().splitlines() if path.exists() else []


async def test_demo_cohort_completes_every_app_and_publishes_artifacts(env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.cohort import fleet_cohort

    path = demo_fleet(tmp_path)
    rows = await fleet_cohort(fleet_file=str(path))
    assert {r.app: r.stage for r in rows} == {
        a: "complete" for a in ("demo-calc", "demo-notes", "demo-weather")
    }
    assert all(r.skill_tasks >= 3 and r.adversarial_issues >= 1 and r.shipped for r in rows)
    notes = {r.app: r.notes for r in rows}
    assert any("protected path changed: ci/protected.cfg" in n for n in notes["demo-notes"])
    assert any("explicit prompt" in n for n in notes["demo-weather"])
    store = SQLiteStore(env)
    assert all(len(store.list_trajectories(r.app)) == 1 for r in rows)
    assert store.completed_cohorts() == 1
    keys = ["fleet-cohort", "fleet-cohort-progress", "app-demo-notes"]
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            sort=ArtifactSort.CREATED_DESC,
        )
    artifacts: dict = {}
    for artifact in found:  # newest first: earlier tests' cohort runs published these keys too
        artifacts.setdefault(artifact.key, artifact)
    assert set(artifacts) == set(keys)
    assert "demo-weather" in str(artifacts["fleet-cohort"].data)
    assert artifacts["fleet-cohort-progress"].data == 100.0

    again = await fleet_cohort(fleet_file=str(path))
    assert all(r.stage == "complete" and r.note == "already complete" for r in again)
    assert all(len(store.list_trajectories(r.app)) == 1 for r in again)


async def test_cohort_respects_max_concurrent_from_the_store(env, tmp_path):
    from fleet.models import FleetConfig
    from flows.cohort import fleet_cohort

    path = demo_fleet(tmp_path)
    SQLiteStore(env).set_fleet_config(FleetConfig(max_concurrent=1))
    rows = await fleet_cohort(fleet_file=str(path), size=3)
    stages = sorted(r.stage for r in rows)
    assert stages == ["complete", "queued", "queued"]
    assert sum("max_concurrent=1" in (r.note or "") for r in rows) == 2


async def test_two_cohort_runs_at_once_process_each_app_once(env, tmp_path):
    from flows.cohort import fleet_cohort

    path = demo_fleet(tmp_path, skill=[*counting(tmp_path, "skill"), "{repo}", "{prompt}"])
    first, second = await asyncio.gather(
        fleet_cohort(fleet_file=str(path)), fleet_cohort(fleet_file=str(path))
    )
    store = SQLiteStore(env)
    for app in ("demo-calc", "demo-notes", "demo-weather"):
        assert store.get_state(app).stage is Stage.COMPLETE
        assert len(store.list_trajectories(app)) == 1
    repos = [Path(line) for line in calls(tmp_path, "skill")]
    # demo-weather's skill runs twice by design (prose, then the explicit retry).
    assert sorted(r.name for r in repos) == [
        "demo-calc",
        "demo-notes",
        "demo-weather",
        "demo-weather",
    ]


async def test_failed_app_records_error_and_trajectory(env, tmp_path):
    from flows.app_evolution import evolve_app

    broken = script(
        tmp_path, "broken", "import sys; sys.stderr.write('model quota exhausted'); sys.exit(4)\n"
    )
    path = demo_fleet(tmp_path, review=[*broken, "{prompt}"])
    state = await evolve_app("demo-calc", fleet_file=str(path), return_state=True)
    assert state.is_failed()
    store = SQLiteStore(env)
    app = store.get_state("demo-calc")
    assert app.stage is Stage.FAILED and "model quota exhausted" in app.error
    [trajectory] = store.list_trajectories("demo-calc")
    assert trajectory.outcome == "failure" and trajectory.reward == 0.0


async def test_the_heartbeat_holds_a_short_claim_through_a_stage_longer_than_the_lease(
    env, tmp_path, monkeypatch
):
    from datetime import UTC, datetime

    from flows.app_evolution import evolve_app

    monkeypatch.setenv("FLEET_APP_LEASE_SECONDS", "1")
    monkeypatch.setenv("FLEET_APP_HEARTBEAT_SECONDS", "0.2")
    get_settings.cache_clear()
    reset_components()
    slow = script(
        tmp_path,
        "slow_review",
        (
            "import os, sys, time\n"
            "time.sleep(3)\n"
            f"os.execv(sys.executable, [sys.executable, {AGENT!r}, 'review', *sys.argv[1:]])\n"
        ),
    )
    path = demo_fleet(tmp_path, review=[*slow, "{repo}", "{prompt}"])
    run = asyncio.create_task(evolve_app("demo-calc", fleet_file=str(path)))
    store = SQLiteStore(env)
    refused = 0
    while not run.done():
        await asyncio.sleep(0.25)
        state = store.get_state("demo-calc")
        if state is not None and state.stage is Stage.ADVERSARIAL_RUNNING:
            # Three leases into the review, another host's run still cannot take the app.
            epoch = store.claim_app("demo-calc", "elsewhere:1", "r2", datetime.now(UTC), 1.0)
            assert epoch is None
            refused += 1
    await run
    assert refused >= 4
    assert store.get_state("demo-calc").stage is Stage.COMPLETE


async def test_killed_mid_review_resumes_without_redoing_or_duplicating(env, tmp_path):
    """A real orchestrator process is kill -9'd during REVIEW; the rerun picks up from there."""
    from prefect.settings import PREFECT_API_URL

    from flows.app_evolution import evolve_app

    marker = tmp_path / "review-started"
    slow_review = script(
        tmp_path,
        "slow_review",
        (f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n"),
    )
    skill = [*counting(tmp_path, "skill"), "{repo}", "{prompt}"]
    path = demo_fleet(tmp_path, skill=skill, review=[*slow_review, "{prompt}"])
    child = subprocess.Popen(
        [
            PY,
            "-c",
            "import asyncio, sys; from flows.app_evolution import evolve_app; "
            "asyncio.run(evolve_app('demo-calc', fleet_file=sys.argv[1]))",
            str(path),
        ],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()):
            assert child.poll() is None, "orchestrator exited before REVIEW"
            assert time.monotonic() < deadline, "REVIEW never started"
            await asyncio.sleep(0.1)
        store = SQLiteStore(env)
        assert store.get_state("demo-calc").stage is Stage.ADVERSARIAL_RUNNING
        tasks_before = len(store.list_tasks("demo-calc", "skill"))
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        if marker.exists() and marker.read_text():
            with contextlib.suppress(ProcessLookupError):  # the orphaned remote "agent"
                os.kill(int(marker.read_text()), signal.SIGKILL)

    demo_fleet(tmp_path, skill=skill)  # the agent is healthy again for the rerun
    held = store.get_state("demo-calc")
    row = await evolve_app("demo-calc", fleet_file=str(path))
    after = store.get_state("demo-calc")
    assert row.stage == "complete" and after.epoch == held.epoch + 1
    assert len(calls(tmp_path, "skill")) == 1  # skillComplete was persisted: not redone
    assert len(store.list_tasks("demo-calc", "skill")) == tasks_before
    assert row.adversarial_issues >= 1


async def test_fleet_config_block_edits_apply_to_the_next_run(env, tmp_path, monkeypatch):
    from blocks.fleet_config import FleetConfigBlock
    from flows.cohort import fleet_cohort

    seen = tmp_path / "review-target"
    review = script(
        tmp_path,
        "review_target",
        "import os, sys\n"
        f"open({str(seen)!r}, 'a').write(os.environ['FLEET_TARGET'] + '\\n')\n"
        f"os.execv(sys.executable, [sys.executable, {AGENT!r}, 'review', *sys.argv[1:]])\n",
    )
    path = demo_fleet(tmp_path, review=[*review, "{repo}", "{prompt}"])
    await FleetConfigBlock(fleet_file=str(path), max_concurrent=1, review_target="mac9").asave(
        "flow-test", overwrite=True
    )
    monkeypatch.setenv("FLEET_CONFIG_BLOCK", "fleet-config/flow-test")
    get_settings.cache_clear()
    SQLiteStore(env).set_fleet_config(FleetConfig(max_concurrent=3))  # `fleet config`'s value
    rows = await fleet_cohort()  # the fleet file comes from the block too
    # The block pins max_concurrent above the store (fleet/config_sources.py), without
    # writing its value over the store's.
    assert sorted(r.stage for r in rows) == ["complete", "queued", "queued"]
    assert SQLiteStore(env).get_fleet_config().max_concurrent == 3
    assert seen.read_text().split() == ["mac9"]


async def test_demo_cohort_on_the_real_postgresql(pg_url, tmp_path, monkeypatch):
    import psycopg

    from fleet.store.postgres import PostgresStore
    from flows.cohort import fleet_cohort

    store = PostgresStore(pg_url)  # applies the migrations
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE app_evolution_states, app_evolution_tasks, trajectories, cohorts, "
            "fleet_config"
        )
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEET_STORE_URL", pg_url)
    get_settings.cache_clear()
    reset_components()
    try:
        rows = await fleet_cohort(fleet_file=str(demo_fleet(tmp_path)))
    finally:
        reset_components()
        get_settings.cache_clear()
    assert [r.stage for r in rows] == ["complete"] * 3
    assert all(len(store.list_trajectories(r.app)) == 1 for r in rows)
    assert store.get_state("demo-notes").epoch >= 1 and store.completed_cohorts() == 1
