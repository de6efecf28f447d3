"""The cohort flow: DISCOVER, then up to max_concurrent app runs, in process or on the workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Annotated, TypeVar, cast
from uuid import UUID

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import arun_deployment
from prefect.exceptions import FailedRun
from prefect.runtime import flow_run as this_run
from prefect.states import Failed, State
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field

from fleet import metrics
from fleet.claim import max_concurrent
from fleet.clients.breaker import breaker_states
from fleet.clock import SystemClock
from fleet.errors import ConfigError, FleetError
from fleet.inflight import dead_on_this_host, in_flight, owner_id
from fleet.ledger import budget_left, cost_summary, with_costs
from fleet.models import Stage
from fleet.ranking import rank_apps, select_cohort
from fleet.report import AppRow, app_row, failure_message, progress_line
from fleet.runview import app_run_tags, cohort_run_name, fleet_file_problem
from fleet.settings import get_settings
from fleet.store.leadership import PlannerLease
from fleet.store.outage import StoreOutage, StoreUnreachable, through_outages
from fleet.wiring import Components
from flows.app_evolution import FleetRunFailed, evolve_one, refused, this_run_id
from flows.config import flow_components

T = TypeVar("T")


class CohortPlan(BaseModel):
    cohort: list[str]
    start: list[str]
    skipped: dict[str, str]
    max_concurrent: int
    budget_spent: str | None = None  # why no app starts: the cohort budget is spent


def discover(comp: Components, size: int | None, fresh: bool, retry_failed: bool) -> CohortPlan:
    """DISCOVER: KARL ranking, the next cohort (10 → 20 → 40), and which of it may start now.

    The cohort is the top `size` apps that still have work; finished apps hold no place in
    it (a success outranks an app without history), but those ranked within the top `size`
    are reported as finished. `max_concurrent` bounds apps in flight across the whole fleet,
    so runs that overlap (the schedule fires every 5 min) never add up to more than it.
    """
    store, settings, now = comp.store, comp.settings, comp.clock.now()
    store.ensure_apps(comp.fleet.app_ids, now)
    ranked = rank_apps(
        comp.fleet.app_ids, store.reward_means(comp.fleet.app_ids), settings.default_reward
    )
    size = size or settings.cohort_size(store.completed_cohorts())
    limit = max_concurrent(comp)
    states = {s.app_id: s for s in store.list_states()}
    held = {a for a, s in states.items() if in_flight(s, now, dead_on_this_host)}
    free = max(0, limit - len(held))
    budget = settings.cohort_budget_usd
    spent = budget_left(store.open_cohort_spend(), budget) if budget is not None else None
    if spent:
        free = 0  # no new app starts; those in flight finish

    def finished(app_id: str) -> str | None:
        stage = states[app_id].stage
        if app_id in held:
            return None
        if stage is Stage.COMPLETE and not fresh:
            return "already complete"
        if stage is Stage.FAILED and not (fresh or retry_failed):
            return "failed earlier"
        return None

    reported = set(select_cohort(ranked, size))
    cohort: list[str] = []
    start: list[str] = []
    skipped: dict[str, str] = {}
    places = 0
    for app_id in ranked:
        if reason := finished(app_id):
            if app_id in reported:
                cohort.append(app_id)
                skipped[app_id] = reason
            continue
        if places == size:
            continue
        places += 1
        cohort.append(app_id)
        if app_id in held:
            skipped[app_id] = "in flight"
        elif len(start) >= free:
            skipped[app_id] = (
                "waiting (cohort budget spent)" if spent else f"waiting (max_concurrent={limit})"
            )
        else:
            start.append(app_id)
    return CohortPlan(
        cohort=cohort, start=start, skipped=skipped, max_concurrent=limit, budget_spent=spent
    )


def _run_name() -> str:
    return cohort_run_name(this_run.parameters.get("size"), this_run.scheduled_start_time)


@flow(name="fleet-cohort", flow_run_name=_run_name, persist_result=False)
async def fleet_cohort(
    size: Annotated[int | None, Field(ge=1)] = None,
    fleet_file: str | None = None,
    fresh: bool = False,
    retry_failed: bool = False,
    fan_out: bool = False,
) -> list[AppRow] | State:
    """Run the next cohort of the fleet; returns one row per cohort app.

    In process (the embedded default, `fleet run`) every app runs as a subflow on this
    event loop. With `fan_out` each app is submitted to the app-evolution deployment, so
    the workers polling its pool share the cohort.

    Args:
        size: Apps in this cohort, at least 1; empty for the progressive 10 → 20 → 40.
        fleet_file: The fleet file, relative to the checkout; empty for FLEET_FLEET_FILE or
            the Fleet Config block's.
        fresh: Run every cohort app again from the start, complete or failed (the demo's
            repos are re-created from their templates).
        retry_failed: Run the apps that failed earlier again.
        fan_out: Submit each app to the app-evolution deployment, so every worker of the
            pool shares the cohort; off, the apps run in this flow run's process.
    """
    try:
        return await plan_and_run(size, fleet_file, fresh, retry_failed, fan_out)
    except StoreOutage as exc:
        # Past the outage budget: a Failed run with one line, no traceback; nothing is lost
        # (stages stay where they were, claims run out by themselves), the next run resumes.
        return Failed(message=str(exc))
    finally:  # the stage durations and retries of this run, for Prometheus (when configured)
        await asyncio.to_thread(
            metrics.push_pipeline, get_settings().metrics_pushgateway, "fleet-cohort"
        )


async def plan_and_run(
    size: int | None, fleet_file: str | None, fresh: bool, retry_failed: bool, fan_out: bool
) -> list[AppRow] | State:
    """The cohort run's body (see `fleet_cohort`); a store outage past its budget escapes it."""
    logger = get_run_logger()
    if problem := fleet_file_problem(fleet_file, Path.cwd()):
        return await refused(problem)
    try:
        comp = await cohort_components(fleet_file)
    except ConfigError as exc:
        return await refused(str(exc))
    run_id = this_run_id("local-cohort")
    start = on_workers if fan_out else in_process
    # DISCOVER and starting the apps hold the planner lease: two schedulers never plan at once.
    async with planning(comp, f"{owner_id()}/{run_id}", logger) as lead:
        if lead is None:
            return []
        # quote(): Prefect hands the task the Components as they are, without walking them.
        plan = await discover_cohort(cast(Components, quote(comp)), size, fresh, retry_failed)
        if plan.budget_spent:
            logger.warning(plan.budget_spent)
        logger.info(
            "cohort of %d: starting %s (max_concurrent=%d); skipped: %s",
            len(plan.cohort),
            ", ".join(plan.start) or "none",
            plan.max_concurrent,
            plan.skipped or "none",
        )
        await stored(comp, comp.store.record_cohort, run_id, plan.cohort, comp.clock.now())
        progress = Progress(
            comp,
            len(plan.start),
            await acreate_progress_artifact(
                progress=0.0,
                key="fleet-cohort-progress",
                description="Apps finished in this cohort run",
            ),
        )
        if not await stored(comp, lead.renew):
            logger.warning("planner lease lost before the apps started: this run starts none")
            return []
        taken = Taken(plan.start)
        running = asyncio.create_task(
            start(comp, plan, fleet_file, fresh, retry_failed, progress, taken)
        )
        # The lease is let go once every started app is claimed (or found taken): from then
        # on the store's claims keep runs apart, and the next planner sees them in flight.
        all_taken = asyncio.create_task(taken.all.wait())
        await asyncio.wait([running, all_taken], return_when=asyncio.FIRST_COMPLETED)
        all_taken.cancel()
    finished = await running
    await progress.close()

    def wrap_up() -> list[AppRow]:
        # Expansion (10 → 20 → 40) counts a cohort once every app in it has finished.
        stages = {s.app_id: s.stage for s in comp.store.list_states()}
        if all(stages[a].terminal for a in plan.cohort):
            comp.store.finish_cohort(run_id, comp.clock.now())
        return [
            finished.get(a) or app_row(comp.store, a, note=plan.skipped.get(a)) for a in plan.cohort
        ]

    rows = await stored(comp, wrap_up)
    costs = await stored(comp, comp.store.work_totals, "app", None, run_id)
    await acreate_table_artifact(
        table=with_costs([r.record() for r in rows], costs),
        key="fleet-cohort",
        description=f"Cohort of {len(plan.cohort)} (started {len(plan.start)})"
        + cost_summary(costs),
    )
    await report_breakers(logger)
    if progress.failed:
        # A returned Failed state, not an exception: the run is red with this one line as its
        # message, and no traceback for apps that failed for reasons of their own.
        message = failure_message(progress.failed, progress.total)
        return Failed(message=message, data=CohortFailed(message, rows))
    return rows


class CohortFailed(FleetError):
    """A cohort run in which apps failed; carries every row (calling the flow raises it)."""

    def __init__(self, message: str, rows: list[AppRow]):
        super().__init__(message)
        self.rows = rows


async def cohort_rows(state: State) -> list[AppRow]:
    """The rows of a finished cohort run, Completed or Failed."""
    result = await state.aresult(raise_on_failure=False)
    if isinstance(result, CohortFailed):
        return result.rows
    if isinstance(result, BaseException):
        raise result
    if not state.is_completed():  # e.g. a store outage past its budget: its one line
        raise FailedRun(state.message or f"the cohort run ended {state.name}")
    return cast(list[AppRow], result)


# The planner lease -------------------------------------------------------------------------
@asynccontextmanager
async def planning(
    comp: Components,
    holder: str,
    logger: logging.Logger | logging.LoggerAdapter,
) -> AsyncIterator[PlannerLease | None]:
    """Lead the planning, or None when another planner still leads after one lease of
    retries (this run then plans nothing: the leader's plan covers the fleet)."""
    s = comp.settings
    lease = PlannerLease(
        comp.store,
        holder,
        comp.clock,
        lease_seconds=s.planner_lease_seconds,
        renew_seconds=s.planner_renew_seconds,
        retry_seconds=s.planner_retry_seconds,
    )
    if not await lead_within(comp, lease, s.planner_lease_seconds):
        leader = await stored(comp, comp.store.get_lease, lease.name)
        logger.info(
            "another planner leads: %s; this run plans nothing",
            leader.holder if leader else "unknown",
        )
        yield None
        return
    try:
        yield lease
    finally:
        # One try: during an outage the lease runs out by itself within one lease.
        with suppress(StoreUnreachable):
            await asyncio.shield(asyncio.to_thread(lease.release))


async def lead_within(comp: Components, lease: PlannerLease, seconds: float) -> bool:
    """Try to lead every `retry_seconds`, for at most `seconds` (a standby takes over from a
    dead leader within one lease; a live leader's plan is left alone)."""
    deadline = lease.clock.now() + timedelta(seconds=seconds)
    while not await stored(comp, lease.try_lead):
        if lease.clock.now() >= deadline:
            return False
        await lease.clock.asleep(lease.retry_seconds)
    return True


class Taken:
    """The started apps whose claim step is over: the planner holds its lease until all are."""

    def __init__(self, app_ids: list[str]):
        self.waiting = set(app_ids)
        self.all = asyncio.Event()
        if not self.waiting:
            self.all.set()

    def one(self, app_id: str) -> None:
        self.waiting.discard(app_id)
        if not self.waiting:
            self.all.set()


@task(name="discover", cache_policy=NO_CACHE, persist_result=False)
async def discover_cohort(
    comp: Components, size: int | None, fresh: bool, retry_failed: bool
) -> CohortPlan:
    """DISCOVER, as a step the UI shows: the ranking and plan are short store reads."""
    return await stored(comp, discover, comp, size, fresh, retry_failed)


async def cohort_components(fleet_file: str | None) -> Components:
    """The cohort's components; opening the store waits out an outage like any store call."""
    comp: Components = await through_outages(
        get_settings(), SystemClock(), "cohort", flow_components, fleet_file
    )
    return comp


async def stored(comp: Components, fn: Callable[..., T], *args: object) -> T:
    """A cohort store call off the event loop. A store outage pauses it (one log line per
    outage) and it goes on when the store is back; past `store_outage_budget_seconds` it
    raises StoreOutage, which ends the cohort run as a clean, resumable failure."""
    result: T = await through_outages(comp.settings, comp.clock, "cohort", fn, *args)
    return result


async def reset_requested(comp: Components, app_id: str, fresh: bool, retry_failed: bool) -> bool:
    """Whether the app starts over; the store is asked only when that depends on its stage."""
    if fresh or not retry_failed:
        return fresh
    return await stored(comp, _stage, comp, app_id) is Stage.FAILED


def _stage(comp: Components, app_id: str) -> Stage:
    """A cohort app's stage (DISCOVER made sure every app of the fleet has a state row)."""
    state = comp.store.get_state(app_id)
    assert state is not None, f"{app_id} has no state row after DISCOVER"
    return state.stage


class Progress:
    """The cohort's progress artifact and log line, one tick per finished app: the done and
    the failed counted apart, each failure logged at WARNING with its reason.

    One artifact update at a time, carrying the latest counts: apps that finish together
    share an API call instead of queueing one each behind the cohort's loop.
    """

    def __init__(self, comp: Components, total: int, artifact_id):
        self.comp, self.total, self.artifact_id = comp, total, artifact_id
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.shown = 0
        self.writer: asyncio.Task | None = None

    async def tick(self, app_id: str, row: AppRow | None = None, ended: str | None = None) -> None:
        """`row` is the app's result when this process ran it; `ended` says how its own flow
        run ended when that was not Completed."""
        if row is None:
            row = await stored(self.comp, app_row, self.comp.store, app_id)
        logger = get_run_logger()
        if row.stage == Stage.FAILED.value or row.error or ended:
            reason = row.error or ended or f"ended at stage {row.stage}"
            self.failed[app_id] = reason
            logger.warning("%s failed: %s (%s)", app_id, reason, self.counts())
        else:
            self.done.append(app_id)
            logger.info("%s finished: %s (%s)", app_id, row.stage, self.counts())
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write())

    @property
    def finished(self) -> int:
        return len(self.done) + len(self.failed)

    async def _write(self) -> None:
        while self.shown < self.finished:
            self.shown = self.finished
            await aupdate_progress_artifact(
                self.artifact_id,
                progress=100.0 * self.shown / self.total,
                description=self.counts(),
            )

    def counts(self) -> str:
        return progress_line(len(self.done), len(self.failed), self.total)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer
        if not self.total:
            await aupdate_progress_artifact(
                self.artifact_id, progress=100.0, description=self.counts()
            )


async def in_process(
    comp: Components,
    plan: CohortPlan,
    fleet_file: str | None,
    fresh: bool,
    retry_failed: bool,
    progress: Progress,
    taken: Taken,
) -> dict[str, AppRow]:
    """Every app as a coroutine on this event loop, its stages tasks of this cohort run.

    A waiting app costs a coroutine; no flow run per app is created, which keeps the
    Prefect API calls per app to its task runs and its summary artifact.
    """
    run_id = this_run_id("local-cohort")

    async def one(app_id: str) -> tuple[str, AppRow | None, str | None]:
        try:
            reset = await reset_requested(comp, app_id, fresh, retry_failed)
            return app_id, await evolve_one(comp, app_id, run_id, reset, on_taken=taken.one), None
        except FleetRunFailed as failed:  # recorded as failed; the row says why
            return app_id, failed.row, None
        except Exception as exc:  # the app's bookkeeping itself broke: its row comes from the store
            return app_id, None, f"app run ended with {type(exc).__name__}: {exc}"
        finally:
            taken.one(app_id)  # a run that broke before its claim step is over with it too

    rows: dict[str, AppRow] = {}
    for finished in asyncio.as_completed([one(a) for a in plan.start]):
        app_id, row, broke = await finished
        if row is not None:
            rows[app_id] = row
        await progress.tick(app_id, row, ended=broke)
    return rows


async def on_workers(
    comp: Components,
    plan: CohortPlan,
    fleet_file: str | None,
    fresh: bool,
    retry_failed: bool,
    progress: Progress,
    taken: Taken,
) -> dict[str, AppRow]:
    """Every app submitted to the app-evolution deployment; workers on any machine run them.

    Submitting does not wait (`timeout=0`); the cohort then reads all its runs' states in one
    API call every `cohort_poll_seconds`, so waiting costs the same for 10 apps as for 1 000.
    The claim in the store still bounds apps in flight by max_concurrent, across workers.
    Rows come from the store (an app's notes stay in its own run's artifact).
    """
    logger = get_run_logger()
    pending: dict[UUID, str] = {}
    for app_id in plan.start:
        submitted = await arun_deployment(
            comp.settings.app_deployment,
            timeout=0,
            as_subflow=True,
            tags=app_run_tags(app_id, this_run.name),
            parameters={
                "app_id": app_id,
                "fleet_file": fleet_file,
                "fresh": await reset_requested(comp, app_id, fresh, retry_failed),
            },
        )
        pending[submitted.id] = app_id
        taken.one(app_id)  # submitted: its run claims it on a worker, the planner is done
    logger.info("submitted %d app runs to %s", len(pending), comp.settings.app_deployment)
    async with get_client() as client:
        while pending:
            await comp.clock.asleep(comp.settings.cohort_poll_seconds)
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
            )
            for flow_run in runs:
                if flow_run.state is not None and flow_run.state.is_final():
                    app_id = pending.pop(flow_run.id)
                    ended = None
                    if not flow_run.state.is_completed():
                        ended = f"app run {flow_run.name} ended {flow_run.state.name}"
                        if flow_run.state.message:
                            ended += f": {flow_run.state.message}"
                    await progress.tick(app_id, ended=ended)
    return {}


async def report_breakers(logger) -> None:
    """The breakers this run's clients used, in the log and as a table the UI keeps."""
    states = breaker_states()
    if not states:
        return
    for name, snap in states.items():
        if snap["state"] != "closed":
            logger.warning("breaker %s is %s: %s", name, snap["state"], snap["last_error"])
    await acreate_table_artifact(
        table=[{"endpoint": name, **snap} for name, snap in states.items()],
        key="fleet-breakers",
        description="Circuit breaker per external endpoint, as the last cohort run left them",
    )
