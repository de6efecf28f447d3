"""The seven stages as plain coroutines of an AppRun: the flows wire them to Prefect.

Each stage reads what it needs from the store, does its I/O through the protocols, and
writes its result back before moving the stage, so a rerun after a crash resumes from
the persisted stage and re-does only the unfinished one (tasks upsert, never duplicate).
Waits (agents, Hydra, checks) are awaited: a waiting app holds a coroutine, not a thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from fleet import metrics
from fleet.claim import ACCEPTED, AppRun, live_key, run_once, spend, start_once
from fleet.clients.base import UNKNOWN_PHASE, GateStatus, QualityGate
from fleet.clock import Clock
from fleet.errors import ConfigError, FleetError, QualityGateError, StageFailed
from fleet.evolve import guarded_evolve
from fleet.models import EvolutionState, Outcome, Stage, Task, Trajectory
from fleet.parsing import (
    NO_EXTRACTOR,
    ParseResult,
    insufficient,
    parse_review_output,
    parse_skill_output,
)
from fleet.prompts import EXPLICIT_SKILL_PROMPT, build_review_prompt
from fleet.ranking import reward_for
from fleet.settings import FleetSettings

__all__ = ["AppRun"]  # the claim's AppRun, re-exported: the stages are functions of it

log = logging.getLogger("fleet.pipeline")
R = TypeVar("R")


def timed(stage: str) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """A stage function's wall time goes to `run.durations[stage]`, whether it succeeds or fails."""

    def decorate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(run: AppRun, *args: Any, **kwargs: Any) -> R:
            started = run.clock.now()
            try:
                return await fn(run, *args, **kwargs)
            finally:
                run.add_duration(stage, started)
                metrics.stage_finished(stage, (run.clock.now() - started).total_seconds())

        return wrapper

    return decorate


def _dropped_note(stage: str, dropped: list[str]) -> str | None:
    """Drops worth an operator's attention (not the review's ISSUE/JSON double listing)."""
    real = [d for d in dropped if "duplicate" not in d]
    return f"{stage} parse dropped {len(real)}: {real[0]}" if real else None


def build_skill_cmd(run: AppRun, prompt: str = "") -> list[str]:
    return run.command(run.fleet.commands.skill, prompt)


def build_review_cmd(run: AppRun, prior: list[Task]) -> list[str]:
    return run.command(run.fleet.commands.review, build_review_prompt(run.app_id, prior))


# DISPATCH ------------------------------------------------------------------------------
@timed("skill")
async def dispatch_skill(run: AppRun, explicit: bool = False) -> str:
    """Run the skill on any machine and return its output; `explicit` is the one retry with
    the explicit prompt, after a first answer gave too few tasks."""
    await run.enter(Stage.SKILL_RUNNING, error="insufficient_tasks" if explicit else None)
    command = build_skill_cmd(run, EXPLICIT_SKILL_PROMPT if explicit else "")

    async def start(key: str) -> str:
        return await run.dispatcher.spawn(command, idempotency_key=key)

    return await run_once(
        run, "skill", 2 if explicit else 1, "spawn", start, run.settings.skill_timeout_seconds
    )


# PARSE ---------------------------------------------------------------------------------
@timed("skill")
async def parse_skill(run: AppRun, output: str, last_try: bool = False) -> list[Task] | None:
    """The skill's tasks, upserted; None when too few came back and a retry is still allowed."""
    floor = run.settings.task_floor
    tasks = await parse_tasks(run, output)
    if insufficient(tasks, floor):
        if not last_try:
            run.notes.append(f"skill gave {len(tasks)} tasks; retried with the explicit prompt")
            return None
        why = "; ".join(tasks.dropped[:3])
        raise StageFailed(
            f"insufficient_tasks: {len(tasks)} task(s) after the explicit retry, "
            f"need {floor}" + (f" ({why})" if why else "")
        )
    if note := _dropped_note("skill", tasks.dropped):
        run.notes.append(note)
    await run.conclude(tasks, Stage.SKILL_COMPLETE)  # fenced: a run that lost the app writes none
    return list(tasks)


async def parse_tasks(run: AppRun, output: str) -> ParseResult:
    """Tier 1 (the marker block) first; tier 2, an LLM over the network, is awaited here and
    its answer handed to the pure parser, which stays free of I/O."""
    limit = run.settings.max_tasks_per_stage
    tasks = parse_skill_output(output, run.app_id, None, max_tasks=limit)
    if run.extractor is None or tasks.tier != "none" or NO_EXTRACTOR not in tasks.dropped:
        return tasks
    try:
        answer = _Answer(await run.extractor.extract(output, run.app_id))
    except Exception as exc:  # the parser records it as a dropped reason, as before
        answer = _Answer(error=exc)
    return parse_skill_output(output, run.app_id, answer, max_tasks=limit)  # type: ignore[arg-type]


class _Answer:
    """The extractor's awaited answer, replayed to the synchronous parser."""

    def __init__(self, items: list[dict] | None = None, error: Exception | None = None):
        self.items, self.error = items or [], error

    def extract(self, output: str, app_id: str) -> list[dict]:
        if self.error is not None:
            raise self.error
        return self.items


async def run_skill(run: AppRun) -> list[Task]:
    """DISPATCH → PARSE, once more with the explicit prompt when too few tasks came back."""
    tasks = await parse_skill(run, await dispatch_skill(run))
    if tasks is None:
        tasks = await parse_skill(run, await dispatch_skill(run, explicit=True), last_try=True)
    assert tasks is not None, "the last try raises insufficient_tasks rather than giving None"
    return tasks


# REVIEW ----------------------------------------------------------------------------------
@timed("review")
async def run_review(run: AppRun, prior: list[Task]) -> list[Task]:
    """Adversarial review on the review target; never skipped."""
    await run.enter(Stage.ADVERSARIAL_RUNNING)
    s = run.settings
    command = build_review_cmd(run, prior)

    async def start(key: str) -> str:
        return await run.dispatcher.dispatch(
            command, target=s.review_target, model=s.review_model, idempotency_key=key
        )

    review = await run_once(run, "review", 1, "dispatch", start, s.review_timeout_seconds)
    issues = parse_review_output(review, run.app_id, max_tasks=s.max_tasks_per_stage)
    if note := _dropped_note("review", issues.dropped):
        run.notes.append(note)
    await run.conclude(issues, Stage.ADVERSARIAL_COMPLETE)  # fenced, as for the skill tasks
    return list(issues)


# EVOLVE ----------------------------------------------------------------------------------
def hydra_deadline(run: AppRun, state: EvolutionState) -> datetime:
    """The 4 h hard stop counts from when hydraBuild first began, across resumes."""
    began = state.stage_started_at if state.stage is Stage.HYDRA_BUILD else None
    began = began or run.clock.now()
    return began + timedelta(seconds=run.settings.hydra_hard_stop_seconds)


def hydra_timeout_message(settings: FleetSettings) -> str:
    hours = settings.hydra_hard_stop_seconds / 3600
    return f"Hydra timeout {hours:g}h"


async def wait_for_quality(
    gate: QualityGate,
    app_id: str,
    clock: Clock,
    poll_seconds: float,
    deadline: datetime,
    on_poll: Callable[[GateStatus | None], Awaitable[object]] | None = None,
) -> GateStatus | None:
    """Poll the gate until it passes; None when the deadline came first.

    A gate that cannot answer is a missed poll, not a verdict: we keep polling until the
    deadline. Configuration errors (no check command) surface at once. Between polls the
    wait is the clock's `asleep`: hours of waiting cost a coroutine.
    """
    while True:
        try:
            status: GateStatus | None = await gate.status(app_id)
        except ConfigError:
            raise
        except (QualityGateError, FleetError) as exc:
            log.warning("quality gate for %s did not answer: %s", app_id, exc)
            status = None
        if on_poll is not None:
            await on_poll(status)
        if status is not None and status.is_passing:
            return status
        remaining = (deadline - clock.now()).total_seconds()
        if remaining <= 0:
            return None
        await clock.asleep(min(poll_seconds, remaining))


async def _renew_unless_passing(run: AppRun, status: GateStatus | None) -> None:
    """A poll's renewal: a passing poll has none, the accepted record after it is fenced."""
    if status is None or not status.is_passing:
        await run.renew()


def _read_then_build(run: AppRun) -> EvolutionState:
    """The stage EVOLVE starts from, then hydraBuild entered, in one trip. A resume rewrites
    it: that renews the claim and keeps its first start, from which the hard stop counts."""
    before = run.state()
    run.set_stage(Stage.HYDRA_BUILD)
    return before


async def start_hydra(run: AppRun, resumed: bool) -> None:
    """Start the evolution: a guarded local run for local repos, else Hydra via the dispatcher."""
    if run.app.repo is not None:
        await guarded_evolve(run)
        return
    command = run.command(run.fleet.commands.evolve)

    async def spawn(key: str) -> str:
        return await run.dispatcher.spawn(command, idempotency_key=key)

    if not resumed:
        await start_once(run, "hydra", 1, "spawn", spawn)
    elif await _gate_has_no_status(run):
        # The crash came between the hydraBuild write and the spawn (nothing recorded), or
        # Hydra forgot the app (its recorded start is spent): start it (again).
        key, effect = await live_key(run, "hydra", 1)
        if effect is not None:
            await spend(run, key, effect.value)
        run.notes.append("Hydra had no status for the app after a resume: started it again")
        log.warning("%s: %s", run.app_id, run.notes[-1])
        await start_once(run, "hydra", 1, "spawn", spawn)
    # Otherwise a remote Hydra started before a crash keeps running: only poll.


async def _gate_has_no_status(run: AppRun) -> bool:
    try:
        return (await run.gate.status(run.app_id)).phase == UNKNOWN_PHASE
    except FleetError:  # a gate that cannot answer now is a missed poll, not a verdict
        return False


@timed("evolve")
async def run_evolve(run: AppRun) -> GateStatus:
    before = await run.call(_read_then_build, run)
    resumed = before.stage is Stage.HYDRA_BUILD
    if resumed and (accepted := await run.get_effect(run.effect_key(ACCEPTED, 1))):
        # The gate passed before a crash that came before `complete`: straight to SHIP.
        run.quality = GateStatus.model_validate_json(accepted.value)
        run.notes.append("evolve had already passed the quality gate: not run again")
        return run.quality
    deadline = hydra_deadline(run, before)
    if run.clock.now() >= deadline:  # resumed after the hard stop: a late pass would not count
        raise StageFailed(hydra_timeout_message(run.settings))
    await start_hydra(run, resumed)
    # Each poll renews the claim: the wait may outlast many leases, and a run that lost the
    # app stops at its next poll. A passing poll does not: the accepted record is fenced.
    status = await wait_for_quality(
        run.gate,
        run.app_id,
        run.clock,
        run.settings.hydra_poll_seconds,
        deadline,
        on_poll=lambda status: _renew_unless_passing(run, status),
    )
    if status is None:
        raise StageFailed(hydra_timeout_message(run.settings))
    await run.record_effect(run.effect_key(ACCEPTED, 1), "marker", status.model_dump_json())
    run.quality = status
    return status


# SHIP ------------------------------------------------------------------------------------
@timed("ship")
async def run_ship(run: AppRun) -> None:
    """TestFlight upload dispatched to the machine with Xcode, never run on the orchestrator."""
    s = run.settings
    await run.renew()  # fenced: only the run that holds the app uploads a build
    command = run.command(run.fleet.commands.ship)

    # Recorded before the wait: a resumed run polls this upload, never sends a second one.
    async def start(key: str) -> str:
        return await run.dispatcher.dispatch(
            command, target=s.ship_target, model="", idempotency_key=key
        )

    await run_once(run, "ship", 1, "ship", start, s.ship_timeout_seconds)
    run.shipped = True
    await run.enter(Stage.COMPLETE)


# LEARN -----------------------------------------------------------------------------------
async def run_learn(run: AppRun, outcome: Outcome, error: str | None = None) -> Trajectory:
    return await asyncio.to_thread(record_learning, run, outcome, error)


def record_learning(run: AppRun, outcome: Outcome, error: str | None = None) -> Trajectory:
    """The run's trajectory: counts, quality, reward and stage durations, for KARL ranking."""
    score = run.quality.score if run.quality else None
    trajectory = Trajectory(
        app_id=run.app_id,
        run_id=run.run_id,
        pipeline=run.app.pipeline,
        skill_tasks=len(run.store.list_tasks(run.app_id, "skill")),
        adversarial_issues=len(run.store.list_tasks(run.app_id, "adversarial")),
        quality_score=score,
        outcome=outcome,
        reward=reward_for(outcome, score),
        durations=dict(run.durations),
        error=error,
        created_at=run.clock.now(),
    )
    run.store.record_trajectory(trajectory)
    return trajectory
