"""Agents die with their run: the run that takes a crashed run's app first stops its agents."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from fleet.claim import APP_RUN, AppRun, gateway_key, start_once, take
from fleet.clock import ManualClock
from fleet.models import Stage
from fleet.procs import APP_RUN_MARKER
from tests.helpers import advance, app_run, demo_fleet, run_components, script

# An agent that keeps editing: it and a grandchild that left its session (setsid) append a
# line to their own file every 0.1 s, after writing down their pids.
WRITER = (
    "import os, subprocess, sys, time\n"
    "out = sys.argv[1]\n"
    "if len(sys.argv) == 2:\n"
    "    subprocess.Popen([sys.executable, __file__, out, 'child'], start_new_session=True)\n"
    "    name = 'parent'\n"
    "else:\n"
    "    name = 'child'\n"
    "open(f'{out}.{name}.pid', 'w').write(str(os.getpid()))\n"
    "while True:\n"
    "    with open(f'{out}.{name}', 'a') as f:\n"
    "        f.write('x\\n')\n"
    "    time.sleep(0.1)\n"
)


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


async def start_writer(run: AppRun, tmp: Path, name: str) -> tuple[Path, list[int]]:
    """Start the writer agent for `run` the way every stage does; its output path and pids."""
    agent = script(tmp, "writer", WRITER)
    out = tmp / name

    async def start(key: str) -> str:
        return await run.dispatcher.spawn([*agent, str(out)], idempotency_key=key)

    await start_once(run, "skill", 1, "spawn", start)
    pids = []
    for who in ("parent", "child"):
        wait_for(Path(f"{out}.{who}.pid"))
        wait_for(Path(f"{out}.{who}"))
        pids.append(int(Path(f"{out}.{who}.pid").read_text()))
    return out, pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_the_run_taking_a_dead_runs_app_stops_its_agents_before_resuming(tmp_path):
    clock = ManualClock()
    dead = app_run(tmp_path, demo_fleet(tmp_path), clock=clock)
    advance(dead, Stage.SKILL_RUNNING)
    out, pids = await start_writer(dead, tmp_path, "edits")
    assert all(APP_RUN_MARKER in psutil.Process(p).environ() for p in pids)
    try:
        # The orchestrator is killed -9: nothing stops its agents, its lease runs out.
        comp = run_components(dead)
        del dead
        clock.advance(comp.settings.app_lease_seconds + 1)

        resumed = take(comp, "demo-calc", "run-2")

        assert isinstance(resumed, AppRun) and resumed.state().stage == Stage.SKILL_RUNNING
        assert not any(alive(p) for p in pids)  # gone before `take` returned
        sizes = [Path(f"{out}.{who}").stat().st_size for who in ("parent", "child")]
        time.sleep(0.3)
        assert [Path(f"{out}.{who}").stat().st_size for who in ("parent", "child")] == sizes
    finally:
        for p in pids:
            if alive(p):
                psutil.Process(p).kill()


async def test_each_runs_marker_is_recorded_under_its_epoch_before_its_first_agent(tmp_path):
    clock = ManualClock()
    first = app_run(tmp_path, demo_fleet(tmp_path), clock=clock)
    advance(first, Stage.SKILL_RUNNING)
    comp = run_components(first)
    await gateway_key(first, first.effect_key("skill", 1))
    clock.advance(comp.settings.app_lease_seconds + 1)
    second = take(comp, "demo-calc", "run-2")
    assert isinstance(second, AppRun)
    await gateway_key(second, second.effect_key("skill", 1))

    markers = {
        e.epoch: e.value
        for e in comp.store.list_effects("demo-calc")
        if e.kind == "marker" and e.key.startswith(APP_RUN + "/")
    }
    assert markers == {first.epoch: first.marker, second.epoch: second.marker}
    assert first.marker != second.marker


async def test_taking_one_app_leaves_another_apps_agents_running(tmp_path):
    clock = ManualClock()
    fleet = demo_fleet(tmp_path)
    dead = app_run(tmp_path, fleet, clock=clock)
    advance(dead, Stage.SKILL_RUNNING)
    other = app_run(tmp_path, fleet, app_id="demo-notes", clock=clock, store=dead.store)
    advance(other, Stage.SKILL_RUNNING)
    _, pids = await start_writer(other, tmp_path, "other")
    try:
        await gateway_key(dead, dead.effect_key("skill", 1))
        comp = run_components(dead)
        clock.advance(comp.settings.app_lease_seconds + 1)
        assert isinstance(take(comp, "demo-calc", "run-2"), AppRun)
        assert all(alive(p) for p in pids)
    finally:
        for p in pids:
            if alive(p):
                psutil.Process(p).kill()
