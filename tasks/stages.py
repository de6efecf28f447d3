"""Prefect tasks: one per app per stage, each wrapping one stage function of fleet.pipeline.

Retries are declared here and only here for the agent's work and the store; the HTTP
clients retry transient transport errors themselves, so `transient` refuses those.
"""

from __future__ import annotations

import asyncio

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from fleet import pipeline
from fleet.clients.base import GateStatus
from fleet.models import Task, Trajectory
from fleet.pipeline import AppRun
from fleet.settings import get_settings

_settings = get_settings()


def transient(task_, task_run, state) -> bool:
    """Retry only failures a fresh attempt can fix (agent failed, store hiccup)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return bool(getattr(exc, "transient", False))


def _stage_task(name: str, timeout: float, retries: int | None = None):
    return task(
        name=name,
        retries=_settings.stage_retries if retries is None else retries,
        retry_delay_seconds=exponential_backoff(_settings.retry_delay_seconds),
        retry_jitter_factor=0.5,
        retry_condition_fn=transient,
        timeout_seconds=timeout,
        cache_policy=NO_CACHE,
        persist_result=False,
        tags=["fleet-stage"],
    )


# The skill may be dispatched twice (insufficient tasks → explicit retry).
@_stage_task("dispatch-and-parse", 2 * _settings.skill_timeout_seconds + 300)
async def dispatch_and_parse(run: AppRun) -> list[Task]:
    return await asyncio.to_thread(pipeline.run_skill, run)


@_stage_task("adversarial-review", _settings.review_timeout_seconds + 300)
async def adversarial_review(run: AppRun, prior: list[Task]) -> list[Task]:
    return await asyncio.to_thread(pipeline.run_review, run, prior)


# The 4 h hard stop is enforced inside on the injected clock; this timeout is a backstop.
@_stage_task(
    "evolve", _settings.hydra_hard_stop_seconds + _settings.evolve_attempts * _settings.skill_timeout_seconds,
    retries=0,
)
async def evolve(run: AppRun) -> GateStatus:
    return await asyncio.to_thread(pipeline.run_evolve, run)


@_stage_task("ship", _settings.ship_timeout_seconds + 300, retries=0)
async def ship(run: AppRun) -> None:
    await asyncio.to_thread(pipeline.run_ship, run)


@_stage_task("learn", 300)
async def learn(run: AppRun, outcome: str, error: str | None = None) -> Trajectory:
    return await asyncio.to_thread(pipeline.run_learn, run, outcome, error)
