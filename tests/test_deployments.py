"""prefect.yaml deploys as README says: cohort every 5 min fanning out per app, reconciler
every 60 s, watchdog every 30 s."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]


async def test_prefect_deploy_all_creates_the_documented_deployments():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PWD": str(ROOT),
    }  # as a shell sets it
    from prefect.client.schemas.actions import VariableCreate

    from blocks.fleet_config import FleetConfigBlock

    # The block names and the fleet file come from Prefect variables (README "Configuration").
    # The block pins nothing: later tests of this session see it in the deployments.
    await FleetConfigBlock().asave("deploy-test", overwrite=True)
    async with get_client() as client:
        with contextlib.suppress(Exception):  # already there from an earlier run in this session
            await client.create_work_pool(WorkPoolCreate(name="fleet-process", type="process"))
        for name, value in (
            ("fleet_config_block", "fleet-config/deploy-test"),
            ("fleet_file", ".fleet/demo/fleet.yaml"),
        ):
            with contextlib.suppress(Exception):
                await client.create_variable(VariableCreate(name=name, value=value))
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    async with get_client() as client:
        deployments = {
            (await client.read_flow(d.flow_id)).name + "/" + d.name: d
            for d in await client.read_deployments()
        }
    cohort = deployments["fleet-cohort/every-5-min"]
    assert cohort.work_pool_name == "fleet-process"
    assert [s.schedule.cron for s in cohort.schedules] == ["*/5 * * * *"]
    assert cohort.parameters == {"fleet_file": ".fleet/demo/fleet.yaml", "fan_out": True}
    env = cohort.job_variables["env"]
    assert env["FLEET_CONFIG_BLOCK"] == "fleet-config/deploy-test"
    assert env["FLEET_STORE_BLOCK"] == "" and env["FLEET_GEMINI_BLOCK"] == ""  # unset: no block
    assert deployments["app-evolution/per-app"].job_variables["env"] == env
    app = deployments["app-evolution/per-app"]
    assert app.work_pool_name == "fleet-process" and not app.schedules
    [daily] = deployments["healing-tuner/daily"].schedules
    assert daily.schedule.cron == "0 4 * * *"
    # The watchdog runs every heartbeat (30 s): a dead machine is down within two of them.
    for name, seconds in (
        ("mesh-reconciler/reconcile-every-60-s", 60),
        ("mesh-watchdog/watchdog-every-30-s", 30),
    ):
        [schedule] = deployments[name].schedules
        assert schedule.schedule.interval.total_seconds() == seconds
    # The form's bounds hold on the server: a cohort of 0 is refused when the run is created.
    assert cohort.enforce_parameter_schema
    from prefect.exceptions import PrefectHTTPStatusError

    async with get_client() as client:
        with pytest.raises(PrefectHTTPStatusError, match="409|422"):
            await client.create_flow_run_from_deployment(cohort.id, parameters={"size": 0})
    # The fleet's runs carry `fleet`; the mesh housekeeping only `mesh`, so filtering on
    # `fleet` hides its 2 880 runs a day.
    assert {"fleet", "cohort"} <= set(cohort.tags) and "fleet" in app.tags
    for name, deployment in deployments.items():
        if name.startswith(("mesh-", "healing-tuner/")):
            assert "mesh" in deployment.tags and "fleet" not in deployment.tags, name
    assert cohort.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
        "directory"
    ] == str(ROOT)

    # What Prefect's scheduler service does every minute: create the next runs of each
    # schedule. (With SQLAlchemy 2.1 this raised, so no scheduled run was ever created.)
    from prefect.server.database import provide_database_interface
    from prefect.server.models.deployments import schedule_runs

    db = provide_database_interface()
    async with db.session_context(begin_transaction=True) as session:
        created = await schedule_runs(session=session, deployment_id=cohort.id, max_runs=3)
    assert len(created) == 3
    async with get_client() as client:
        runs = [await client.read_flow_run(run_id) for run_id in created]
    assert all(r.state.is_scheduled() and r.expected_start_time.minute % 5 == 0 for r in runs)
