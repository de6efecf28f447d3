"""What an operator reads in Prefect: a cohort with failed apps is Failed, counts done and
failed apart, and says why (session-wide Prefect harness, the demo fleet in a temp dir)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import PY, demo_fleet, script
from tests.test_flows import AGENT, env  # noqa: F401  (the per-test store and home)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def review_failing_for(tmp_path, app_id: str) -> list[str]:
    """The demo agent's review, except for `app_id`, whose review fails with a reason."""
    return script(
        tmp_path,
        "review_but",
        "import os, sys\n"
        f"if sys.argv[1].endswith({app_id!r}):\n"
        "    sys.stderr.write('model quota exhausted'); sys.exit(4)\n"
        f"os.execv({PY!r}, [{PY!r}, {AGENT!r}, 'review', *sys.argv[1:]])\n",
    )


@contextlib.contextmanager
def flow_run_logs() -> Iterator[list[logging.LogRecord]]:
    """The records of Prefect's run loggers (caplog's root handler does not see them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


async def test_a_cohort_with_a_failed_app_ends_failed_and_says_why(env, tmp_path):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.cohort import CohortFailed, cohort_rows, fleet_cohort

    path = demo_fleet(
        tmp_path, review=[*review_failing_for(tmp_path, "demo-calc"), "{repo}", "{prompt}"]
    )
    with flow_run_logs() as records:
        state = await fleet_cohort(fleet_file=str(path), return_state=True)

    assert state.is_failed(), state
    assert state.message.startswith("1 of 3 apps failed — demo-calc: ")
    assert "model quota exhausted" in state.message and "Traceback" not in state.message
    with pytest.raises(CohortFailed):
        await state.aresult()
    assert {r.app: r.stage for r in await cohort_rows(state)} == {
        "demo-calc": "failed",
        "demo-notes": "complete",
        "demo-weather": "complete",
    }
    [warning] = [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING
        and r.getMessage().startswith("demo-calc failed: ")
        and r.getMessage().endswith("1 failed of 3)")  # the cohort's count, not the app's line
    ]
    assert "model quota exhausted" in warning
    async with get_client() as client:
        [progress] = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fleet-cohort-progress"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert progress.data == 100.0 and progress.description == "2 done, 1 failed of 3"


async def test_cohort_and_task_runs_are_named_for_what_they_are(env, tmp_path):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.cohort import cohort_rows, fleet_cohort

    state = await fleet_cohort(fleet_file=str(demo_fleet(tmp_path)), size=1, return_state=True)
    [row] = await cohort_rows(state)
    run_id = state.state_details.flow_run_id
    async with get_client() as client:
        cohort = await client.read_flow_run(run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    assert re.fullmatch(r"cohort-\d{4}-\d\d-\d\dT\d\d:\d\d-size1", cohort.name), cohort.name
    names = {t.name for t in tasks}
    stages = ("dispatch", "parse", "adversarial-review", "evolve", "ship", "learn")
    assert {f"{stage}-{row.app}" for stage in stages} <= names, names


@pytest.mark.parametrize("flow_name", ["fleet_cohort", "evolve_app"])
async def test_a_missing_fleet_file_is_refused_in_one_line_without_a_traceback(env, flow_name):  # noqa: F811
    import flows.app_evolution
    import flows.cohort

    flow = getattr(flows.cohort, flow_name, None) or getattr(flows.app_evolution, flow_name)
    params = {"app_id": "demo-calc"} if flow_name == "evolve_app" else {}
    with flow_run_logs() as records:
        state = await flow(fleet_file="/nonexistent.yaml", return_state=True, **params)
    assert state.is_failed()
    assert state.message.startswith("fleet_file: /nonexistent.yaml does not exist — ")
    [line] = [r for r in records if r.getMessage() == state.message]
    assert line.levelno == logging.ERROR  # what `prefect deployment run --watch` streams
    assert not any(r.exc_info for r in records)


def test_the_demo_logs_to_the_ui_at_info_and_keeps_the_terminal_quiet(tmp_path):
    """`fleet demo` against a server: the cohort run's INFO lines reach the API, the terminal
    shows none of them (without -v)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    from fleet.clock import utcnow

    child_env = {
        **os.environ,
        "FLEET_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOGGING_TO_API_ENABLED": "true",  # as outside the test session
        "COLUMNS": "80",
    }
    child_env.pop("FLEET_STORE_URL", None)
    before = utcnow()  # the session's API holds other tests' cohort runs: only this one counts
    demo = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "demo", "--size", "1"],
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "| INFO" not in demo.stdout + demo.stderr

    async def cohort_logs() -> tuple[str, list[str]]:
        async with get_client() as client:
            [run] = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["fleet-cohort"])),
                # Runs the session's deployments scheduled (random names, a future expected
                # start) sort first by start time: only a finished run is the demo's.
                flow_run_filter=FlowRunFilter(
                    start_time=FlowRunFilterStartTime(after_=before),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.COMPLETED])
                    ),
                ),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
        return run.name, [log.message for log in logs if log.level == logging.INFO]

    name, info = asyncio.run(cohort_logs())
    assert name.endswith("-size1")
    assert any(line.startswith("cohort of 1: starting") for line in info), info
    assert any("finished: complete (1 done, 0 failed of 1)" in line for line in info), info


async def test_fresh_on_the_demo_runs_an_app_again_on_its_original_repo(env, tmp_path):  # noqa: F811
    from flows.app_evolution import evolve_app

    path = demo_fleet(tmp_path)
    first = await evolve_app("demo-weather", fleet_file=str(path), return_state=True)
    assert first.is_completed()
    again = await evolve_app("demo-weather", fleet_file=str(path), fresh=True, return_state=True)
    assert again.is_completed(), again.message  # not insufficient_tasks on the fixed repo


async def test_watch_shows_why_a_deployed_run_was_refused(tmp_path):
    """`prefect deployment run … --watch` on a worker: the refusal's one line, no traceback."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    from flows.app_evolution import evolve_app
    from tests.test_fanout import ROOT, start_worker, stop

    name = f"watch-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    deployment = await evolve_app.to_deployment(
        name=name, work_pool_name=name, job_variables={"working_dir": str(ROOT)}
    )
    await deployment.apply()
    child_env = {
        **os.environ,
        "FLEET_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "COLUMNS": "300",
    }
    worker = start_worker(name, name, child_env, tmp_path / "worker.log")
    try:
        watched = await asyncio.to_thread(
            subprocess.run,
            [
                *(sys.executable, "-m", "prefect", "deployment", "run"),
                f"app-evolution/{name}",
                *("--param", "app_id=demo-calc", "--param", "fleet_file=/nonexistent.yaml"),
                *("--watch", "--watch-timeout", "240"),
            ],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop(worker)
    out = watched.stdout + watched.stderr
    assert watched.returncode == 1, out
    assert "fleet_file: /nonexistent.yaml does not exist — " in out
    assert "Traceback" not in out and "Flow run finished in state 'Failed'" in out
