"""Prefect tasks: one per app per stage, each awaiting one stage coroutine of fleet.pipeline.

Retries are declared here and only here for the agent's work and the store; the HTTP
clients retry transient transport errors themselves, so `transient` refuses those.
Timeouts and retry counts are read from the run's live settings at call time (a Fleet
Config block edit applies to the next run without a redeploy): each public function below
calls its task `.with_options(...)` built from `run.settings`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from prefect import Task as PrefectTask
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from fleet import metrics, pipeline
from fleet.clients.base import GateStatus
from fleet.models import Outcome, Task, Trajectory
from fleet.pipeline import AppRun

SLACK_SECONDS = 300  # beyond the agent's own timeout: the store writes around it


class _CompletedIsItsState(logging.Filter):
    """Drops the "Finished in state Completed()" line Prefect logs for every task run: the
    task run's state says the same. At 89 apps those lines were half of the log rows the
    server stored (536 of 1 072) and cost the cohort 0.1–0.8 s on 2 cores. A failed or
    retried task run's line is kept, and so is every line the stages log themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg == COMPLETED_LINE)


COMPLETED_LINE = "Finished in state Completed()"
logging.getLogger("prefect.task_runs").addFilter(_CompletedIsItsState())


def transient(task_, task_run, state) -> bool:
    """Retry only failures a fresh attempt can fix (agent failed, store hiccup)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    retry = bool(getattr(exc, "transient", False))
    if retry:  # Prefect asks only while retries are left: True means it runs again
        metrics.stage_retried(task_.name)
    return retry


def stage_task(name: str):
    # No tags: each tag costs a concurrency-limit call to the API per task run.
    return task(
        name=name,
        task_run_name=name + "-{run.app_id}",
        retry_jitter_factor=0.5,
        retry_condition_fn=transient,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


def live(stage: PrefectTask, run: AppRun, timeout: float, retries: bool = True) -> PrefectTask:
    """The stage task with this run's timeout and retry budget.

    Callers pass the run as `quote(run)`: Prefect then does not walk the AppRun (its fleet
    file, store, clients) looking for upstream results on every task call.
    """
    s = run.settings
    delays = tuple(exponential_backoff(s.retry_delay_seconds)(s.stage_retries)) if retries else None
    return _with_options(stage, timeout, s.stage_retries if retries else 0, delays)


@functools.lru_cache(maxsize=256)
def _with_options(
    stage: PrefectTask, timeout: float, retries: int, delays: tuple[float, ...] | None
) -> PrefectTask:
    """A task's copy per set of options, made once: a copy is a whole Task (Prefect reads
    the function's source for its key), and every app calls every stage."""
    options: dict[str, Any] = {"timeout_seconds": timeout, "retries": retries}
    if delays is not None:
        options["retry_delay_seconds"] = list(delays)
    return stage.with_options(**options)


@stage_task("dispatch")
async def _dispatch(run: AppRun, explicit: bool) -> str:
    return await pipeline.dispatch_skill(run, explicit)


@stage_task("parse")
async def _parse(run: AppRun, output: str, last_try: bool) -> list[Task] | None:
    tasks = await pipeline.parse_skill(run, output, last_try)
    if tasks is not None:
        get_run_logger().info("%s: PARSE gave %d skill tasks", run.app_id, len(tasks))
    return tasks


@stage_task("adversarial-review")
async def _review(run: AppRun, prior: list[Task]) -> list[Task]:
    issues = await pipeline.run_review(run, prior)
    get_run_logger().info("%s: REVIEW found %d adversarial issues", run.app_id, len(issues))
    return issues


@stage_task("evolve")
async def _evolve(run: AppRun) -> GateStatus:
    quality = await pipeline.run_evolve(run)
    get_run_logger().info("%s: quality gate passing (cycle %d)", run.app_id, quality.cycle)
    return quality


@stage_task("ship")
async def _ship(run: AppRun) -> None:
    await pipeline.run_ship(run)
    get_run_logger().info("%s: shipped to %s", run.app_id, run.settings.ship_target)


@stage_task("learn")
async def _learn(run: AppRun, outcome: Outcome, error: str | None) -> Trajectory:
    return await pipeline.run_learn(run, outcome, error)


async def dispatch(run: AppRun, explicit: bool = False) -> str:
    """DISPATCH the skill; its output."""
    timeout = run.settings.skill_timeout_seconds + SLACK_SECONDS
    return await live(_dispatch, run, timeout)(quote(run), explicit)


async def parse(run: AppRun, output: str, last_try: bool = False) -> list[Task] | None:
    """PARSE the skill's output into tasks; None when too few came and one retry is left."""
    return await live(_parse, run, SLACK_SECONDS)(quote(run), output, last_try)


async def review(run: AppRun, prior: list[Task]) -> list[Task]:
    """REVIEW: the adversarial issues."""
    timeout = run.settings.review_timeout_seconds + SLACK_SECONDS
    return await live(_review, run, timeout)(quote(run), quote(prior))


async def evolve(run: AppRun) -> GateStatus:
    """EVOLVE until the quality gate passes. The 4 h hard stop is enforced inside on the
    injected clock; this timeout is a backstop. Not retried: a retry would start Hydra again."""
    s = run.settings
    backstop = s.hydra_hard_stop_seconds + s.evolve_attempts * s.skill_timeout_seconds
    return await live(_evolve, run, backstop, retries=False)(quote(run))


async def ship(run: AppRun) -> None:
    """SHIP: the TestFlight upload; not retried, an upload must not be sent twice."""
    timeout = run.settings.ship_timeout_seconds + SLACK_SECONDS
    await live(_ship, run, timeout, retries=False)(quote(run))


async def learn(run: AppRun, outcome: Outcome, error: str | None = None) -> Trajectory:
    """LEARN: the trajectory KARL ranks by."""
    return await live(_learn, run, SLACK_SECONDS)(quote(run), outcome, error)
