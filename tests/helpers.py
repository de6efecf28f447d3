"""Builders shared by pipeline and flow tests: a demo fleet in a temp dir, an AppRun on it."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from fleet.clients.base import Dispatcher
from fleet.clients.local import LocalExecutor, LocalQualityGate
from fleet.clock import Clock, ManualClock
from fleet.demo import create_demo_fleet
from fleet.fleetfile import load_fleet
from fleet.models import Stage
from fleet.pipeline import AppRun
from fleet.settings import FleetSettings
from fleet.store.sqlite import SQLiteStore
from fleet.wiring import Components

PY = sys.executable


def demo_fleet(tmp: Path, **commands: list[str]) -> Path:
    """The demo fleet under `tmp`, with some stage commands replaced."""
    path = create_demo_fleet(tmp / "demo")
    if commands:
        data = yaml.safe_load(path.read_text())
        data["commands"].update(commands)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def script(tmp: Path, name: str, body: str) -> list[str]:
    """A tiny agent program written to disk; returns its argv prefix."""
    path = tmp / f"{name}.py"
    path.write_text(body)
    return [PY, str(path)]


def app_run(
    tmp: Path,
    fleet_path: Path,
    app_id: str = "demo-calc",
    clock: Clock | None = None,
    settings: FleetSettings | None = None,
    store: SQLiteStore | None = None,
) -> AppRun:
    settings = settings or FleetSettings(home=tmp / "home", hydra_poll_seconds=300)
    fleet = load_fleet(fleet_path)
    clock = clock or ManualClock()
    store = store or SQLiteStore(tmp / "fleet.db")
    store.ensure_apps([app_id], clock.now())
    epoch = store.claim_app(app_id, "test:1", "run-1", clock.now(), settings.app_lease_seconds)
    checks = {a.id: (a.check, a.repo) for a in fleet.apps if a.check}
    return AppRun(
        app=fleet.app(app_id),
        fleet=fleet,
        run_id="run-1",
        epoch=epoch,
        store=store,
        dispatcher=LocalExecutor(workdir=tmp / "exec"),
        gate=LocalQualityGate(checks),
        extractor=None,
        settings=settings,
        clock=clock,
    )


HAPPY_PATH = (
    Stage.SKILL_RUNNING,
    Stage.SKILL_COMPLETE,
    Stage.ADVERSARIAL_RUNNING,
    Stage.ADVERSARIAL_COMPLETE,
    Stage.HYDRA_BUILD,
    Stage.COMPLETE,
)


def advance(run: AppRun, until: Stage) -> None:
    """Write the stages of a successful run, in order, up to and including `until`."""
    for stage in HAPPY_PATH[: HAPPY_PATH.index(until) + 1]:
        run.set_stage(stage)


def run_components(run: AppRun, dispatcher: Dispatcher | None = None) -> Components:
    """The components `run` was built from (another dispatcher: a new process's)."""
    return Components(
        settings=run.settings,
        fleet=run.fleet,
        store=run.store,
        dispatcher=dispatcher or run.dispatcher,
        gate=run.gate,
        extractor=None,
        clock=run.clock,
    )
