"""The cohort's planning step holds the planner lease: two planners never plan at once."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from fleet.clock import ManualClock
from fleet.settings import FleetSettings
from fleet.store.sqlite import SQLiteStore
from flows.cohort import planning

log = logging.getLogger("test.planner")


def comp(store: SQLiteStore, clock: ManualClock, tmp_path, **settings: float) -> SimpleNamespace:
    return SimpleNamespace(
        store=store, clock=clock, settings=FleetSettings(home=tmp_path / "home", **settings)
    )


async def test_two_planners_at_once_one_plans_the_other_takes_over_after_it(tmp_path):
    store, clock = SQLiteStore(tmp_path / "fleet.db"), ManualClock()
    planning_now: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    led: list[str] = []

    async def plan(name: str) -> None:
        async with planning(comp(store, clock, tmp_path), name, log) as lead:
            assert lead is not None, f"{name} never led"
            planning_now.append(name)
            overlaps.append(tuple(planning_now))
            led.append(name)
            if name == "a":  # lead until the standby has retried once, then release
                while not clock.sleeps:
                    await asyncio.sleep(0)
            planning_now.remove(name)

    await asyncio.gather(plan("a"), plan("b"))
    assert led == ["a", "b"] and all(len(o) == 1 for o in overlaps)
    assert clock.sleeps and clock.sleeps[0] == 2  # b retried every planner_retry_seconds
    lease = store.get_lease("planner")
    assert lease is not None and lease.holder == "b" and lease.epoch == 2


async def test_a_planner_that_cannot_lead_within_one_lease_skips_planning(tmp_path, caplog):
    store = SQLiteStore(tmp_path / "fleet.db")
    leader_clock, standby_clock = ManualClock(), ManualClock()
    long = comp(store, leader_clock, tmp_path, planner_lease_seconds=600)
    async with planning(long, "host:1/run-a", log) as lead:
        assert lead is not None
        with caplog.at_level(logging.INFO, logger="test.planner"):
            async with planning(comp(store, standby_clock, tmp_path), "host:2/run-b", log) as other:
                assert other is None
    assert "another planner leads: host:1/run-a" in caplog.text
    assert sum(standby_clock.sleeps) >= 15  # it waited one lease, retrying, before giving up
    assert store.get_lease("planner").expires_at <= leader_clock.now()  # released on exit


async def test_a_dead_leaders_lease_is_taken_over_within_one_lease(tmp_path):
    store, clock = SQLiteStore(tmp_path / "fleet.db"), ManualClock()
    dead = comp(store, clock, tmp_path)
    from fleet.store.leadership import PlannerLease

    assert PlannerLease(store, "dead:1/run", clock).try_lead()  # and never renews nor releases
    started = clock.now()
    async with planning(dead, "standby:2/run", log) as lead:
        assert lead is not None
    assert (clock.now() - started).total_seconds() <= 16
