"""The seven stages as plain functions of an AppRun: the flows wire them to Prefect.

Each stage reads what it needs from the store, does its I/O through the protocols, and
writes its result back before moving the stage, so a rerun after a crash resumes from
the persisted stage and re-does only the unfinished one (tasks upsert, never duplicate).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, TypeVar

from fleet.clients.base import UNKNOWN_PHASE, Dispatcher, Extractor, GateStatus, QualityGate
from fleet.clock import Clock
from fleet.errors import ConfigError, FleetError, QualityGateError, StageFailed
from fleet.fleetfile import AppSpec, FleetFile, render
from fleet.models import EvolutionState, Stage, Task, Trajectory
from fleet.parsing import insufficient, parse_review_output, parse_skill_output
from fleet.prompts import EXPLICIT_SKILL_PROMPT, build_review_prompt
from fleet.ranking import reward_for
from fleet.settings import FleetSettings
from fleet.store.base import Store

log = logging.getLogger("fleet.pipeline")
R = TypeVar("R")


@dataclass
class AppRun:
    """One run's hold on one app: its claim epoch, its collaborators and what it measured."""

    app: AppSpec
    fleet: FleetFile
    run_id: str
    epoch: int
    store: Store
    dispatcher: Dispatcher
    gate: QualityGate
    extractor: Extractor | None
    settings: FleetSettings
    clock: Clock
    durations: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: GateStatus | None = None
    shipped: bool = False

    @property
    def app_id(self) -> str:
        return self.app.id

    def state(self) -> EvolutionState:
        state = self.store.get_state(self.app_id)
        assert state is not None, "claimed apps always have a state row"
        return state

    def set_stage(self, stage: Stage, error: str | None = None) -> EvolutionState:
        """Every stage write carries the claim epoch and renews the claim's lease."""
        return self.store.set_stage(
            self.app_id, stage, self.epoch, self.clock.now(), error=error,
            lease_seconds=self.settings.app_lease_seconds,
        )

    def command(self, template: list[str], prompt: str = "") -> list[str]:
        return render(
            template, app_id=self.app_id, pipeline=self.app.pipeline,
            repo=str(self.app.repo or ""), prompt=prompt,
        )

    def add_duration(self, stage: str, started: datetime) -> None:
        self.durations[stage] = round(
            self.durations.get(stage, 0.0) + (self.clock.now() - started).total_seconds(), 3
        )


def timed(stage: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """A stage function's wall time goes to `run.durations[stage]`, whether it succeeds or fails."""
    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def wrapper(run: AppRun, *args, **kwargs) -> R:
            started = run.clock.now()
            try:
                return fn(run, *args, **kwargs)
            finally:
                run.add_duration(stage, started)
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


# DISPATCH + PARSE ----------------------------------------------------------------------
@timed("skill")
def run_skill(run: AppRun) -> list[Task]:
    """Dispatch the skill, parse its tasks (retrying once with the explicit prompt), upsert."""
    run.set_stage(Stage.SKILL_RUNNING)
    timeout = run.settings.skill_timeout_seconds
    output = run.dispatcher.poll_and_retrieve(run.dispatcher.spawn(build_skill_cmd(run)), timeout)
    tasks = parse_skill_output(output, run.app_id, run.extractor, max_tasks=run.settings.max_tasks_per_stage)
    if insufficient(tasks, run.settings.task_floor):
        run.notes.append(f"skill gave {len(tasks)} tasks; retried with the explicit prompt")
        run.set_stage(Stage.SKILL_RUNNING, error="insufficient_tasks")
        task_id = run.dispatcher.spawn(build_skill_cmd(run, EXPLICIT_SKILL_PROMPT))
        output = run.dispatcher.poll_and_retrieve(task_id, timeout)
        tasks = parse_skill_output(output, run.app_id, run.extractor, max_tasks=run.settings.max_tasks_per_stage)
        if insufficient(tasks, run.settings.task_floor):
            why = "; ".join(tasks.dropped[:3])
            raise StageFailed(
                f"insufficient_tasks: {len(tasks)} task(s) after the explicit retry, "
                f"need {run.settings.task_floor}" + (f" ({why})" if why else "")
            )
    if note := _dropped_note("skill", tasks.dropped):
        run.notes.append(note)
    run.set_stage(Stage.SKILL_RUNNING)  # fenced: a run that lost the app meanwhile writes no tasks
    run.store.upsert_tasks(tasks, run.clock.now())
    run.set_stage(Stage.SKILL_COMPLETE)
    return list(tasks)


# REVIEW ----------------------------------------------------------------------------------
@timed("review")
def run_review(run: AppRun, prior: list[Task]) -> list[Task]:
    """Adversarial review on the review target; never skipped."""
    run.set_stage(Stage.ADVERSARIAL_RUNNING)
    s = run.settings
    task_id = run.dispatcher.dispatch(build_review_cmd(run, prior), target=s.review_target, model=s.review_model)
    review = run.dispatcher.poll_and_retrieve(task_id, s.review_timeout_seconds)
    issues = parse_review_output(review, run.app_id, max_tasks=s.max_tasks_per_stage)
    if note := _dropped_note("review", issues.dropped):
        run.notes.append(note)
    run.set_stage(Stage.ADVERSARIAL_RUNNING)  # fenced, as for the skill tasks
    run.store.upsert_tasks(issues, run.clock.now())
    run.set_stage(Stage.ADVERSARIAL_COMPLETE)
    return list(issues)


# EVOLVE ----------------------------------------------------------------------------------
def hydra_deadline(run: AppRun, state: EvolutionState) -> datetime:
    """The 4 h hard stop counts from when hydraBuild first began, across resumes."""
    began = state.stage_started_at if state.stage is Stage.HYDRA_BUILD and state.stage_started_at else run.clock.now()
    return began + timedelta(seconds=run.settings.hydra_hard_stop_seconds)


def hydra_timeout_message(settings: FleetSettings) -> str:
    hours = settings.hydra_hard_stop_seconds / 3600
    return f"Hydra timeout {hours:g}h"


def wait_for_quality(
    gate: QualityGate, app_id: str, clock: Clock, poll_seconds: float, deadline: datetime,
    on_poll: Callable[[GateStatus | None], None] = lambda status: None,
) -> GateStatus | None:
    """Poll the gate until it passes; None when the deadline came first.

    A gate that cannot answer is a missed poll, not a verdict: we keep polling until the
    deadline. Configuration errors (no check command) surface at once.
    """
    while True:
        try:
            status: GateStatus | None = gate.status(app_id)
        except ConfigError:
            raise
        except (QualityGateError, FleetError) as exc:
            log.warning("quality gate for %s did not answer: %s", app_id, exc)
            status = None
        on_poll(status)
        if status is not None and status.is_passing:
            return status
        remaining = (deadline - clock.now()).total_seconds()
        if remaining <= 0:
            return None
        clock.sleep(min(poll_seconds, remaining))


def start_hydra(run: AppRun, resumed: bool) -> None:
    """Start the evolution: a guarded local run for local repos, else Hydra via the dispatcher."""
    if run.app.repo is not None:
        from fleet.evolve import guarded_evolve

        guarded_evolve(run)
    elif not resumed:
        run.dispatcher.spawn(run.command(run.fleet.commands.evolve))
    elif _gate_has_no_status(run):
        # The crash came between the hydraBuild write and the spawn: Hydra never heard of it.
        run.notes.append("Hydra had no status for the app after a resume: started it again")
        log.warning("%s: %s", run.app_id, run.notes[-1])
        run.dispatcher.spawn(run.command(run.fleet.commands.evolve))
    # Otherwise a remote Hydra started before a crash keeps running: only poll.


def _gate_has_no_status(run: AppRun) -> bool:
    try:
        return run.gate.status(run.app_id).phase == UNKNOWN_PHASE
    except FleetError:  # a gate that cannot answer now is a missed poll, not a verdict
        return False


@timed("evolve")
def run_evolve(run: AppRun) -> GateStatus:
    before = run.state()
    resumed = before.stage is Stage.HYDRA_BUILD
    deadline = hydra_deadline(run, before)
    run.set_stage(Stage.HYDRA_BUILD)
    if run.clock.now() >= deadline:  # resumed after the hard stop: a late pass would not count
        raise StageFailed(hydra_timeout_message(run.settings))
    start_hydra(run, resumed)

    def renew(_: GateStatus | None) -> None:
        run.set_stage(Stage.HYDRA_BUILD)  # keeps the claim alive and fenced while we poll

    status = wait_for_quality(run.gate, run.app_id, run.clock, run.settings.hydra_poll_seconds, deadline, renew)
    if status is None:
        raise StageFailed(hydra_timeout_message(run.settings))
    run.quality = status
    return status


# SHIP ------------------------------------------------------------------------------------
@timed("ship")
def run_ship(run: AppRun) -> None:
    """TestFlight upload dispatched to the machine with Xcode, never run on the orchestrator."""
    s = run.settings
    run.set_stage(Stage.HYDRA_BUILD)  # fenced: only the run that holds the app uploads a build
    task_id = run.dispatcher.dispatch(run.command(run.fleet.commands.ship), target=s.ship_target, model="")
    run.dispatcher.poll_and_retrieve(task_id, s.ship_timeout_seconds)
    run.shipped = True
    run.set_stage(Stage.COMPLETE)


# LEARN -----------------------------------------------------------------------------------
def run_learn(run: AppRun, outcome: str, error: str | None = None) -> Trajectory:
    score = run.quality.score if run.quality else None
    trajectory = Trajectory(
        app_id=run.app_id, run_id=run.run_id, pipeline=run.app.pipeline,
        skill_tasks=len(run.store.list_tasks(run.app_id, "skill")),
        adversarial_issues=len(run.store.list_tasks(run.app_id, "adversarial")),
        quality_score=score, outcome=outcome, reward=reward_for(outcome, score),
        durations=dict(run.durations), error=error, created_at=run.clock.now(),
    )
    run.store.record_trajectory(trajectory)
    return trajectory
