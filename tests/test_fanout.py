"""A fanned-out cohort on two real process workers of one pool: apps split, each runs once."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fleet.models import Stage
from fleet.settings import get_settings
from fleet.store.sqlite import SQLiteStore
from fleet.wiring import reset_components
from tests.helpers import demo_fleet

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]


def start_worker(pool: str, name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            pool,
            "--name",
            name,
            "--limit",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def ran_by(log: Path) -> set[str]:
    """The flow runs a worker started: both may try one run, the server lets only one have it."""
    text = log.read_text()
    tried = set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", text))
    return tried - set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", text))


def stop(worker: subprocess.Popen) -> None:
    try:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


async def test_fanned_out_cohort_is_split_between_two_workers_and_runs_each_app_once(
    tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from flows.app_evolution import evolve_app
    from flows.cohort import fleet_cohort

    suffix = uuid.uuid4().hex[:8]
    pool, deployment = f"fanout-{suffix}", f"fanout-{suffix}"
    db = tmp_path / "fleet.db"
    fleet_env = {
        "FLEET_HOME": str(tmp_path / "home"),
        "FLEET_STORE_URL": f"sqlite:///{db}",
        "FLEET_APP_DEPLOYMENT": f"app-evolution/{deployment}",
        "FLEET_COHORT_POLL_SECONDS": "1",
    }
    for key, value in fleet_env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    reset_components()
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    app_deployment = await evolve_app.to_deployment(
        name=deployment, work_pool_name=pool, job_variables={"working_dir": str(ROOT)}
    )
    deployment_id = await app_deployment.apply()

    env = {
        **os.environ,
        **fleet_env,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [
        start_worker(pool, f"worker-{w}", env, log) for w, log in zip("ab", logs, strict=True)
    ]
    try:
        rows = await fleet_cohort(fleet_file=str(demo_fleet(tmp_path)), fan_out=True)
    finally:
        for worker in workers:
            stop(worker)
        reset_components()
        get_settings.cache_clear()

    assert sorted(r.stage for r in rows) == ["complete"] * 3
    store = SQLiteStore(db)
    for app in ("demo-calc", "demo-notes", "demo-weather"):
        assert store.get_state(app).stage is Stage.COMPLETE
        assert len(store.list_trajectories(app)) == 1  # LEARN once: the app ran once
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    apps = sorted(r.parameters["app_id"] for r in runs)
    assert apps == ["demo-calc", "demo-notes", "demo-weather"]  # one run per app, none twice
    assert all(r.state.is_completed() for r in runs)
    # Findable: the fleet's tag, the app's, and the cohort run that sent it (one for all three).
    assert all({"fleet", f"app:{r.parameters['app_id']}"} <= set(r.tags) for r in runs)
    [cohort_tag] = {t for r in runs for t in r.tags if t.startswith("cohort:")}
    assert re.fullmatch(r"cohort:cohort-\S+T\d\d:\d\d-progressive", cohort_tag), cohort_tag
    ran = {log.name: ran_by(log) for log in logs}
    assert set.union(*ran.values()) == {str(r.id) for r in runs}
    assert not set.intersection(*ran.values())  # no run was picked up by both
    assert all(ran.values()), f"one worker ran every app: {ran}"
