"""Stage tasks read their timeouts and retry budgets from the run's live settings."""

from __future__ import annotations

import logging

from fleet.settings import FleetSettings
from tasks.stages import SLACK_SECONDS, _dispatch, _evolve, live
from tests.helpers import app_run, demo_fleet


def test_timeouts_and_retries_come_from_the_runs_settings_at_call_time(tmp_path):
    settings = FleetSettings(home=tmp_path / "home", skill_timeout_seconds=42, stage_retries=5)
    run = app_run(tmp_path, demo_fleet(tmp_path), settings=settings)
    dispatch = live(_dispatch, run, run.settings.skill_timeout_seconds + SLACK_SECONDS)
    assert (dispatch.timeout_seconds, dispatch.retries) == (42 + SLACK_SECONDS, 5)
    run.settings = settings.model_copy(update={"stage_retries": 1})  # an edited Fleet Config block
    assert live(_dispatch, run, 60).retries == 1
    evolve = live(_evolve, run, 7, retries=False)
    assert (evolve.timeout_seconds, evolve.retries) == (7, 0)
    assert _dispatch.timeout_seconds is None  # nothing frozen at import


def test_the_same_options_reuse_one_task_copy(tmp_path):
    """A copy of a task is a whole Task (Prefect hashes the function's source for its key):
    89 apps calling a stage with the same settings share one, made once."""
    run = app_run(tmp_path, demo_fleet(tmp_path))
    assert live(_dispatch, run, 60) is live(_dispatch, run, 60)
    assert live(_dispatch, run, 60) is not live(_dispatch, run, 61)
    assert live(_dispatch, run, 60).retry_delay_seconds == [
        run.settings.retry_delay_seconds * 2**i for i in range(run.settings.stage_retries)
    ]


def test_a_completed_task_runs_finish_line_is_left_to_its_state():
    """Prefect logs "Finished in state Completed()" for every task run: at 89 apps half of
    the log rows the server stored (536 of 1 072), saying what the task run's state says.
    The line is dropped; a failed or retried task run's is kept, as are the stages' own."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("prefect.task_runs")
    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("Finished in state Completed()")
        logger.info("app001: PARSE gave 3 skill tasks")
        logger.error("Finished in state Failed('Task run encountered an exception')")
        logger.info("Finished in state AwaitingRetry()")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == [
        "app001: PARSE gave 3 skill tasks",
        "Finished in state Failed('Task run encountered an exception')",
        "Finished in state AwaitingRetry()",
    ]
