"""The cohort flow: DISCOVER ranks the fleet, then up to max_concurrent app flows run at once."""

from __future__ import annotations

import asyncio

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from pydantic import BaseModel

from fleet.clients.breaker import breaker_states
from fleet.models import Stage
from fleet.ranking import rank_apps, select_cohort
from fleet.report import AppRow, app_row
from fleet.wiring import Components
from flows.config import flow_components
from flows.app_evolution import evolve_app, max_concurrent


class CohortPlan(BaseModel):
    cohort: list[str]
    start: list[str]
    skipped: dict[str, str]
    max_concurrent: int


def discover(comp: Components, size: int | None, fresh: bool, retry_failed: bool) -> CohortPlan:
    """DISCOVER: KARL ranking, the next cohort (10 → 20 → 40), and which of it may start now.

    The cohort is the top `size` apps that still have work; finished apps hold no place in
    it (a success outranks an app without history), but those ranked within the top `size`
    are reported as finished. `max_concurrent` bounds apps in flight across the whole fleet,
    so runs that overlap (the schedule fires every 5 min) never add up to more than it.
    """
    store, settings, now = comp.store, comp.settings, comp.clock.now()
    store.ensure_apps(comp.fleet.app_ids, now)
    ranked = rank_apps(comp.fleet.app_ids, store.reward_means(comp.fleet.app_ids), settings.default_reward)
    size = size or settings.cohort_size(store.completed_cohorts())
    limit = max_concurrent(comp)
    states = {s.app_id: s for s in store.list_states()}
    in_flight = {a for a, s in states.items() if s.owner and s.lease_until and s.lease_until > now}
    free = max(0, limit - len(in_flight))

    def finished(app_id: str) -> str | None:
        stage = states[app_id].stage
        if app_id in in_flight:
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
        if app_id in in_flight:
            skipped[app_id] = "in flight"
        elif len(start) >= free:
            skipped[app_id] = f"waiting (max_concurrent={limit})"
        else:
            start.append(app_id)
    return CohortPlan(cohort=cohort, start=start, skipped=skipped, max_concurrent=limit)


@flow(name="fleet-cohort", persist_result=False)
async def fleet_cohort(size: int | None = None, fleet_file: str | None = None, fresh: bool = False,
                       retry_failed: bool = False) -> list[AppRow]:
    """Run the next cohort of the fleet; returns one row per cohort app."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    comp = await flow_components(fleet_file)
    plan = discover(comp, size, fresh, retry_failed)
    run_id = str(flow_run.get_id() or "local-cohort")
    logger.info(
        "cohort of %d: starting %s (max_concurrent=%d); skipped: %s", len(plan.cohort),
        ", ".join(plan.start) or "none", plan.max_concurrent, plan.skipped or "none",
    )
    comp.store.record_cohort(run_id, plan.cohort, comp.clock.now())
    progress = await acreate_progress_artifact(
        progress=0.0, key="fleet-cohort-progress", description="Apps finished in this cohort run"
    )

    async def one(app_id: str) -> tuple[str, AppRow | None]:
        reset = fresh or (retry_failed and comp.store.get_state(app_id).stage is Stage.FAILED)
        state = await evolve_app(app_id, run_id=None, fleet_file=fleet_file, fresh=reset, return_state=True)
        outcome = await state.aresult(raise_on_failure=False)
        row = outcome if isinstance(outcome, AppRow) else getattr(outcome, "row", None)
        if row is None:  # the app flow itself crashed before it could report
            logger.error("%s: app flow ended %s: %s", app_id, state.type.value, outcome)
        return app_id, row

    done = 0
    finished_rows: dict[str, AppRow] = {}
    for finished in asyncio.as_completed([one(a) for a in plan.start]):
        app_id, row = await finished
        if row is not None:
            finished_rows[app_id] = row
        done += 1
        logger.info("%s finished: %s (%d/%d)", app_id, comp.store.get_state(app_id).stage.value,
                    done, len(plan.start))
        await aupdate_progress_artifact(progress, progress=100.0 * done / len(plan.start))
    if not plan.start:
        await aupdate_progress_artifact(progress, progress=100.0)
    # Expansion (10 → 20 → 40) counts a cohort once every app in it has finished.
    if all(comp.store.get_state(a).stage.terminal for a in plan.cohort):
        comp.store.finish_cohort(run_id, comp.clock.now())

    rows = [finished_rows.get(a) or app_row(comp.store, a, note=plan.skipped.get(a)) for a in plan.cohort]
    await acreate_table_artifact(
        table=[r.record() for r in rows], key="fleet-cohort",
        description=f"Cohort of {len(plan.cohort)} (started {len(plan.start)})",
    )
    await report_breakers(logger)
    return rows


async def report_breakers(logger) -> None:
    """The breakers this run's clients used, in the log and as a table the UI keeps."""
    states = breaker_states()
    if not states:
        return
    for name, snap in states.items():
        if snap["state"] != "closed":
            logger.warning("breaker %s is %s: %s", name, snap["state"], snap["last_error"])
    await acreate_table_artifact(
        table=[{"endpoint": name, **snap} for name, snap in states.items()], key="fleet-breakers",
        description="Circuit breaker per external endpoint, as the last cohort run left them",
    )
