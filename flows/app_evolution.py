"""The app flow: DISCOVER's pick goes through DISPATCH → PARSE → REVIEW → EVOLVE → SHIP → LEARN."""

from __future__ import annotations

import asyncio

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact

from fleet.errors import ConfigError, FleetError, StaleLease
from fleet.models import Stage, validate_app_id
from fleet.pipeline import AppRun
from fleet.report import AppRow, app_row, markdown_summary
from fleet.wiring import Components, dead_local_owner, owner_id
from flows.config import flow_components
from tasks.stages import adversarial_review, dispatch_and_parse, evolve, learn, ship


def claim(comp: Components, app_id: str, run_id: str) -> AppRun | None:
    """Take the app for this run, or None when another live run holds it or `max_concurrent`
    apps are in flight (checked in the same step, so overlapping cohort runs cannot exceed it)."""
    store, now = comp.store, comp.clock.now()
    store.ensure_apps([app_id], now)
    held = store.get_state(app_id)
    epoch = store.claim_app(
        app_id, owner_id(), run_id, now, comp.settings.app_lease_seconds,
        steal_from=dead_local_owner(held.owner if held else None),
        max_in_flight=max_concurrent(comp),
    )
    if epoch is None:
        return None
    return AppRun(
        app=comp.fleet.app(app_id), fleet=comp.fleet, run_id=run_id, epoch=epoch, store=store,
        dispatcher=comp.dispatcher, gate=comp.gate, extractor=comp.extractor,
        settings=comp.settings, clock=comp.clock,
    )


def max_concurrent(comp: Components) -> int:
    return comp.store.get_fleet_config().max_concurrent or comp.settings.max_concurrent


def not_claimed_note(comp: Components, app_id: str) -> str:
    state = comp.store.get_state(app_id)
    if state and state.owner and state.lease_until and state.lease_until >= comp.clock.now():
        return "in flight elsewhere"
    return f"waiting (max_concurrent={max_concurrent(comp)})"


@flow(name="app-evolution", flow_run_name="evolve-{app_id}", persist_result=False)
async def evolve_app(app_id: str, run_id: str | None = None, fleet_file: str | None = None,
                     fresh: bool = False) -> AppRow:
    """Run one app from its persisted stage to `complete` or `failed`; resumable after a crash."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    validate_app_id(app_id)
    comp = await flow_components(fleet_file)
    if app_id not in comp.fleet.app_ids:
        raise ConfigError(f"app {app_id!r} is not in the fleet file; known apps: {', '.join(comp.fleet.app_ids)}")
    run_id = run_id or str(flow_run.get_id() or "local")
    run = await asyncio.to_thread(claim, comp, app_id, run_id)
    if run is None:
        note = not_claimed_note(comp, app_id)
        logger.info("%s: %s; skipped", app_id, note)
        return app_row(comp.store, app_id, note=note)
    # Decide on the state only while holding the claim: a run that just finished the app
    # must not be followed by a second pass over it.
    state = run.state()
    if state.stage.terminal:
        if not fresh:
            comp.store.release_app(app_id, run.epoch)
            logger.info("%s is already %s; pass fresh=True to run it again", app_id, state.stage.value)
            return app_row(comp.store, app_id, note=f"already {state.stage.value}")
        comp.store.reset_app(app_id, comp.clock.now())
        run = await asyncio.to_thread(claim, comp, app_id, run_id)
        if run is None:
            return app_row(comp.store, app_id, note=not_claimed_note(comp, app_id))
    error: str | None = None
    try:
        stage = run.state().stage
        logger.info("%s: starting at stage %s", app_id, stage.value)
        if stage.before(Stage.SKILL_COMPLETE):
            tasks = await dispatch_and_parse(run)
            logger.info("%s: PARSE gave %d skill tasks", app_id, len(tasks))
        else:
            tasks = comp.store.list_tasks(app_id, "skill")
        if stage.before(Stage.ADVERSARIAL_COMPLETE):
            issues = await adversarial_review(run, tasks)
            logger.info("%s: REVIEW found %d adversarial issues", app_id, len(issues))
        if stage.before(Stage.COMPLETE):
            quality = await evolve(run)
            logger.info("%s: quality gate passing (cycle %d)", app_id, quality.cycle)
            await ship(run)
            logger.info("%s: shipped to %s", app_id, comp.settings.ship_target)
    except StaleLease as exc:
        logger.warning("%s: %s", app_id, exc)
        return app_row(comp.store, app_id, note="claim lost to a newer run")
    except Exception as exc:  # any stage failure ends this run of the app as `failed`
        error = str(exc) if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
        logger.error("%s failed: %s", app_id, error)
        await asyncio.to_thread(run.set_stage, Stage.FAILED, error[:2000])
    finally:
        await asyncio.to_thread(comp.store.release_app, app_id, run.epoch)
    await learn(run, "failure" if error else "success", error)
    row = await asyncio.to_thread(app_row, comp.store, app_id, None, run.notes)
    await acreate_markdown_artifact(
        markdown=markdown_summary(row), key=f"app-{app_id.replace('.', '-').replace('_', '-')}",
        description=f"Evolution of {app_id}",
    )
    if error:
        raise FleetRunFailed(f"{app_id}: {error}", row)
    return row


class FleetRunFailed(FleetError):
    """Raised at the end of a failed app run so Prefect shows the run as Failed; carries the row."""

    def __init__(self, message: str, row: AppRow):
        super().__init__(message)
        self.row = row
