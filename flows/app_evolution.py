"""The app flow: DISCOVER's pick goes through DISPATCH → PARSE → REVIEW → EVOLVE → SHIP → LEARN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.logging.handlers import APILogHandler
from prefect.states import Failed, State

from fleet import metrics
from fleet.claim import AppRun, NotClaimed, take_waiting_out_outages
from fleet.demo import restore_demo_repo
from fleet.errors import ConfigError, FleetError, InvalidAppId, StaleLease
from fleet.models import Stage, Task, validate_app_id
from fleet.report import AppRow, app_row, markdown_summary
from fleet.runview import fleet_file_problem
from fleet.store.heartbeat import ClaimHeartbeat
from fleet.store.outage import StoreOutage
from fleet.wiring import Components
from flows.config import flow_components
from tasks.stages import dispatch, evolve, learn, parse, review, ship


@flow(name="app-evolution", flow_run_name="evolve-{app_id}", persist_result=False)
async def evolve_app(
    app_id: str, run_id: str | None = None, fleet_file: str | None = None, fresh: bool = False
) -> AppRow | State:
    """Run one app from its persisted stage to `complete` or `failed`; resumable after a crash.

    Args:
        app_id: The app, as the fleet file names it ([a-z0-9._-], 1–64 characters).
        run_id: The cohort run this app belongs to; empty for this flow run's own id.
        fleet_file: The fleet file, relative to the checkout; empty for FLEET_FLEET_FILE or
            the Fleet Config block's.
        fresh: Start the app over even when it is complete or failed (a demo app's repo is
            re-created from its template).
    """
    if problem := fleet_file_problem(fleet_file, Path.cwd()):
        return await refused(problem)
    try:
        comp = await app_components(app_id, fleet_file)
    except (ConfigError, InvalidAppId) as exc:
        return await refused(str(exc))
    try:
        return await evolve_one(comp, app_id, run_id or this_run_id(), fresh)
    finally:  # this run's stage durations and retries, for Prometheus (when configured)
        await asyncio.to_thread(
            metrics.push_pipeline,
            comp.settings.metrics_pushgateway,
            "fleet-app",
            {"app": app_id},
        )


async def refused(message: str) -> State:
    """A parameter the operator got wrong: one line in the run's log and state message, no
    traceback (calling the flow directly raises it as a ConfigError). The line is sent before
    the state, so `prefect deployment run --watch`, which stops at the state, shows it."""
    get_run_logger().error(message)
    await APILogHandler.aflush()
    return Failed(message=message, data=ConfigError(message))


async def evolve_one(
    comp: Components,
    app_id: str,
    run_id: str,
    fresh: bool = False,
    on_taken: Callable[[str], object] | None = None,
) -> AppRow:
    """The seven stages of one app: the app flow's body, and each app's in an in-process
    cohort (there its stages are tasks of the cohort run: no flow run per app to create).
    `on_taken` hears when the claim step is over (taken or not): the planner waits for it."""
    run = await take_waiting_out_outages(comp, app_id, run_id, fresh)
    if on_taken is not None:
        on_taken(app_id)
    if isinstance(run, NotClaimed):
        return await skipped(comp, app_id, run.note)
    if fresh:
        await renew_demo_repo(run)
    async with holding(run) as outcome:
        stage = await current_stage(run)
        if stage.before(Stage.SKILL_COMPLETE):
            tasks = await parse(run, await dispatch(run))
            if tasks is None:  # too few tasks: DISPATCH once more, with the explicit prompt
                tasks = await parse(run, await dispatch(run, explicit=True), last_try=True)
            assert tasks is not None, "the last try raises insufficient_tasks, never gives None"
        else:
            tasks = await skill_tasks(run)
        if stage.before(Stage.ADVERSARIAL_COMPLETE):
            await review(run, tasks)
        if stage.before(Stage.COMPLETE):
            await evolve(run)
            await ship(run)
    return await learn_and_report(run, outcome)


# The bookkeeping around the stages -------------------------------------------------------
@dataclass
class Outcome:
    """How the stages ended: an error marks the app failed; a lost claim ends the run quietly."""

    error: str | None = None
    lost: str | None = None
    outage: bool = False  # the store stayed down past the budget: nothing more can be written


@asynccontextmanager
async def holding(run: AppRun) -> AsyncIterator[Outcome]:
    """Hold the app for the stages: a failure marks it `failed`; the claim is always let go."""
    outcome = Outcome()
    logger = get_run_logger()
    s = run.settings
    # The claim is a short lease (app_lease_seconds) this heartbeat renews while the run
    # lives: a run that dies stops renewing, and its app is free again within one lease.
    beat = ClaimHeartbeat(
        run.store,
        run.app_id,
        run.epoch,
        clock=run.clock,
        lease_seconds=s.app_lease_seconds,
        every_seconds=s.app_heartbeat_seconds,
        outage_budget=s.store_outage_budget_seconds,
    )
    try:
        async with beat:
            yield outcome
    except StaleLease as exc:
        logger.warning("%s: %s", run.app_id, exc)
        outcome.lost = str(exc)
    except StoreOutage as exc:
        # Resumable as it stands: the stage stays where it was, the claim runs out by itself.
        outcome.error, outcome.outage = str(exc), True
        logger.error("%s: %s", run.app_id, exc)
    except Exception as exc:  # any stage failure ends this run of the app as `failed`
        outcome.error = str(exc) if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
        logger.error("%s failed: %s", run.app_id, outcome.error)
        await run.enter(Stage.FAILED, outcome.error[:2000])
    finally:
        if not outcome.outage:
            await run.release()


async def learn_and_report(run: AppRun, outcome: Outcome) -> AppRow:
    """LEARN, then the app's summary artifact; a failed run raises so Prefect shows it failed."""
    if outcome.lost:
        return await asyncio.to_thread(app_row, run.store, run.app_id, "claim lost to a newer run")
    if outcome.outage:  # no LEARN, no store read: the store is down
        raise FleetRunFailed(
            f"{run.app_id}: {outcome.error}",
            AppRow(
                app=run.app_id,
                stage="unknown (store down)",
                skill_tasks=0,
                adversarial_issues=0,
                quality=None,
                shipped=False,
                duration_s=sum(run.durations.values()),
                error=outcome.error,
                note="resumable once the store is back",
                notes=run.notes,
            ),
        )
    await learn(run, "failure" if outcome.error else "success", outcome.error)
    row = await asyncio.to_thread(app_row, run.store, run.app_id, None, run.notes)
    await acreate_markdown_artifact(
        markdown=markdown_summary(row),
        key=f"app-{run.app_id.replace('.', '-').replace('_', '-')}",
        description=f"Evolution of {run.app_id}",
    )
    if outcome.error:
        raise FleetRunFailed(f"{run.app_id}: {outcome.error}", row)
    return row


async def app_components(app_id: str, fleet_file: str | None) -> Components:
    validate_app_id(app_id)
    comp = await flow_components(fleet_file)
    if app_id not in comp.fleet.app_ids:
        raise ConfigError(
            f"app {app_id!r} is not in the fleet file; known apps: {', '.join(comp.fleet.app_ids)}"
        )
    return comp


def this_run_id(default: str = "local") -> str:
    from prefect.runtime import flow_run

    return str(flow_run.get_id() or default)


async def skipped(comp: Components, app_id: str, note: str) -> AppRow:
    get_run_logger().info("%s: %s; skipped", app_id, note)
    return await asyncio.to_thread(app_row, comp.store, app_id, note)


async def renew_demo_repo(run: AppRun) -> None:
    """A demo app started over begins on its original repo: its last run fixed it, and the
    demo agent would find too few tasks there. Other fleets' repos are never touched."""
    repo = run.app.repo
    if repo is None or (await run.astate()).stage is not Stage.QUEUED:
        return
    if await asyncio.to_thread(restore_demo_repo, repo):
        get_run_logger().info("%s: demo repo laid out again from its template", run.app_id)


async def current_stage(run: AppRun) -> Stage:
    stage = await run.starting_stage()
    get_run_logger().info("%s: starting at stage %s", run.app_id, stage.value)
    return stage


async def skill_tasks(run: AppRun) -> list[Task]:
    return await asyncio.to_thread(run.store.list_tasks, run.app_id, "skill")


class FleetRunFailed(FleetError):
    """Raised at the end of a failed app run so Prefect shows the run as Failed; carries the row."""

    def __init__(self, message: str, row: AppRow):
        super().__init__(message)
        self.row = row
