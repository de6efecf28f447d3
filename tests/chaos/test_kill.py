"""`kill -9` of a real `fleet run` (its whole process group) at a chosen moment, against the
Aura and Hydra dev servers, resumed by an immediate rerun on the same host and by a standby
on another host: every app ends complete, no task twice, each app shipped exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fleet.devservers.aura import AuraDevServer
from fleet.devservers.hydra import HydraDevServer
from fleet.models import Stage
from fleet.store.sqlite import SQLiteStore
from tests.helpers import PY, demo_fleet

AGENT = str(Path(__file__).resolve().parents[2] / "examples" / "demo" / "agent.py")
CHECK = [PY, "-m", "unittest", "discover", "-s", "tests", "-t", "."]
TOKEN = "chaos-kill-token-51c2e8"
APPS = ("demo-calc", "demo-weather")  # two apps: a cohort, and 2 cores stay enough
RUN_TIMEOUT = 150.0
# A stage command held at a gate: it marks that it started, then waits for a "go" file (the
# dev server's env is an allowlist, so the paths come in argv), then runs the real agent.
HOLD = """\
import os, sys, time
flags, name, argv = sys.argv[1], sys.argv[2], sys.argv[4:]
open(os.path.join(flags, name + ".started"), "a").close()
deadline = time.monotonic() + 120
while not os.path.exists(os.path.join(flags, "go")) and time.monotonic() < deadline:
    time.sleep(0.05)
os.execv(argv[0], argv)
"""
# Runs the CLI as if on another machine: the standby cannot see whether the dead run's pid
# lives, so it must wait out the lease, as a second worker on another host does.
OTHER_HOST = (
    "import runpy, socket, sys; socket.gethostname = lambda: 'standby-host'; "
    "sys.argv[0] = 'fleet'; runpy.run_module('fleet.cli', run_name='__main__')"
)


@dataclass
class Rig:
    """One fleet on the shared dev servers, its SQLite store and the `fleet run`s on it."""

    root: Path
    aura: AuraDevServer
    hydra: HydraDevServer
    held: str  # the stage whose command waits at the gate ("" = none)
    fleet_file: Path = field(init=False)
    db: Path = field(init=False)
    flags: Path = field(init=False)
    repos: Path = field(init=False)

    def __post_init__(self) -> None:
        self.fleet_file = demo_fleet(self.root)
        self.repos = self.fleet_file.parent / "repos"
        self.db = self.root / "fleet.db"
        self.flags = self.root / "flags"
        self.flags.mkdir()
        hold = self.root / "hold.py"
        hold.write_text(HOLD)
        data = yaml.safe_load(self.fleet_file.read_text())
        for mode in ("skill", "review", "evolve", "ship"):
            argv = [PY, AGENT, mode, f"{self.repos}/{{app_id}}"]
            argv += ["{prompt}"] if mode != "ship" else []
            if mode == self.held:
                argv = [PY, str(hold), str(self.flags), f"{mode}-{{app_id}}", "--", *argv]
            data["commands"][mode] = argv
        data["apps"] = [a for a in data["apps"] if a["id"] in APPS]
        for app in data["apps"]:
            del app["repo"], app["check"]  # remote apps: Hydra is the gate
            self.hydra.set_check(app["id"], CHECK, cwd=self.repos / app["id"])
        self.fleet_file.write_text(yaml.safe_dump(data, sort_keys=False))

    @property
    def store(self) -> SQLiteStore:
        return SQLiteStore(self.db)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "FLEET_HOME": str(self.root / f"home-{name}"),
            "PREFECT_HOME": str(self.root / f"prefect-{name}"),
            "FLEET_STORE_URL": f"sqlite:///{self.db}",
            "FLEET_AURA_URL": self.aura.url,
            "FLEET_AURA_TOKEN": TOKEN,
            "FLEET_HYDRA_URL": self.hydra.url,
            "FLEET_HYDRA_TOKEN": TOKEN,
            "FLEET_HYDRA_POLL_SECONDS": "0.5",
            "FLEET_GATEWAY_POLL_INITIAL_SECONDS": "0.2",
            "FLEET_GATEWAY_POLL_MAX_SECONDS": "0.5",
            "FLEET_APP_LEASE_SECONDS": "6",
            "FLEET_APP_HEARTBEAT_SECONDS": "2",
            "FLEET_PLANNER_LEASE_SECONDS": "3",
            "FLEET_PLANNER_RENEW_SECONDS": "1",
            "FLEET_PLANNER_RETRY_SECONDS": "0.5",
            "COLUMNS": "200",
            **extra,
        }
        env.pop("PREFECT_API_URL", None)
        return env

    def start(self, name: str, *, other_host: bool = False) -> subprocess.Popen[str]:
        """`fleet run` in a process group of its own (the kill takes its children too)."""
        cli = ["-c", OTHER_HOST] if other_host else ["-m", "fleet.cli"]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [
                sys.executable,
                *cli,
                "run",
                "--fleet",
                str(self.fleet_file),
                "--size",
                str(len(APPS)),
            ],
            cwd=self.root,
            env=self.env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def output(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_until(self, moment: Callable[[], bool], proc: subprocess.Popen[str]) -> float:
        started = time.monotonic()
        while not moment():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the moment:\n{self.output('first')}")
            if time.monotonic() - started > RUN_TIMEOUT:
                raise AssertionError(f"moment never came:\n{self.output('first')}")
            time.sleep(0.05)
        return time.monotonic() - started

    def stages(self) -> dict[str, Stage | None]:
        store = self.store
        try:
            return {a: (s.stage if (s := store.get_state(a)) else None) for a in APPS}
        finally:
            store.close()

    def in_stage(self, stage: Stage) -> bool:
        return all(s is stage for s in self.stages().values()) and all(
            (self.flags / f"{self.held}-{a}.started").exists() for a in APPS
        )

    def ship_recorded(self) -> bool:
        store = self.store
        try:
            return all(any(e.kind == "ship" for e in store.list_effects(a)) for a in APPS)
        finally:
            store.close()

    def release(self) -> None:
        (self.flags / "go").touch()

    def duplicate_tasks(self) -> int:
        with sqlite3.connect(self.db) as db:
            rows = db.execute(
                "SELECT COUNT(*) - COUNT(DISTINCT app_id || source || description || "
                "COALESCE(file, '')) FROM app_evolution_tasks"
            ).fetchone()
        return int(rows[0])

    def ship_effects(self) -> dict[str, int]:
        store = self.store
        try:
            return {a: sum(e.kind == "ship" for e in store.list_effects(a)) for a in APPS}
        finally:
            store.close()

    def ships_run(self) -> dict[str, int]:
        """How many ship commands the gateway ran per app of this rig."""
        return {
            a: sum(
                "ship" in t.argv and f"{self.repos}/{a}" in t.argv and t.status != "queued"
                for t in self.aura.tasks()
            )
            for a in APPS
        }

    def lease_over(self) -> None:
        """Wait until no app's claim is live any more (as seen from another host)."""
        from datetime import UTC, datetime

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            store = self.store
            try:
                leases = [s.lease_until for a in APPS if (s := store.get_state(a))]
            finally:
                store.close()
            if all(u is None or u < datetime.now(UTC) for u in leases):
                return
            time.sleep(0.1)
        raise AssertionError("the dead run's leases never ran out")


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def finish(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise


@pytest.fixture(scope="module")
def hydra() -> Iterator[HydraDevServer]:
    server = HydraDevServer(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def aura(tmp_path: Path) -> Iterator[AuraDevServer]:
    """A gateway per scenario: effect keys are (app, stage, attempt) only, so two fleets with
    the same app ids on one gateway collide (422) — see the report on issue 8."""
    server = AuraDevServer(token=TOKEN, workdir=tmp_path / "gateway", max_parallel=16).start()
    yield server
    server.stop()


MOMENTS: dict[str, tuple[str, Callable[[Rig], bool]]] = {
    "review": ("review", lambda rig: rig.in_stage(Stage.ADVERSARIAL_RUNNING)),
    "after-ship-effect": ("ship", Rig.ship_recorded),
}


def resume_after_kill(rig: Rig, moment: str, standby: bool) -> tuple[float, float, str]:
    """Kill the first run at `moment`, resume it; returns (kill at, resumed in, its output)."""
    first = rig.start("first")
    try:
        killed_at = rig.wait_until(lambda: MOMENTS[moment][1](rig), first)
    finally:
        kill_group(first)
    killed = time.monotonic()
    if standby:
        rig.lease_over()  # a standby elsewhere sees the claims live until their lease ends
    second = rig.start("second", other_host=standby)
    rig.release()
    code = finish(second)
    output = rig.output("second")
    assert code == 0, output
    return killed_at, time.monotonic() - killed, output


@pytest.mark.parametrize("standby", [False, True], ids=["rerun", "standby"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_of_the_orchestrator_loses_and_repeats_nothing(
    aura: AuraDevServer, hydra: HydraDevServer, tmp_path: Path, moment: str, standby: bool
) -> None:
    rig = Rig(tmp_path, aura, hydra, held=MOMENTS[moment][0])
    killed_at, took, output = resume_after_kill(rig, moment, standby)
    assert rig.stages() == dict.fromkeys(APPS, Stage.COMPLETE), output
    assert rig.duplicate_tasks() == 0
    assert rig.ship_effects() == dict.fromkeys(APPS, 1)
    assert rig.ships_run() == dict.fromkeys(APPS, 1)
    assert "Traceback" not in output
    print(f"\nFIGURE kill at {moment} ({killed_at:.1f} s in), {took:.1f} s to complete")
