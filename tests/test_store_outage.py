"""outage_tolerant with a clock moved by hand: waits out an outage inside the budget with one
log line each way, ends past it in a one-line StoreOutage, lets every other error through."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fleet.clock import ManualClock
from fleet.errors import StaleLease, StoreUnavailable
from fleet.settings import FleetSettings
from fleet.store.outage import (
    StoreOutage,
    StoreUnreachable,
    outage_tolerant,
    outage_tolerant_sync,
)
from tests.store_contract import T0


class Flaky:
    """A store call that fails while the clock is before `back_at` seconds from T0."""

    def __init__(self, clock: ManualClock, back_at: float, value: str = "state"):
        self.clock, self.back_at, self.value, self.calls = clock, back_at, value, 0

    def __call__(self) -> str:
        self.calls += 1
        if (self.clock.now() - T0).total_seconds() < self.back_at:
            raise StoreUnreachable(
                "PostgreSQL store at db:5432/fleet: cannot connect: "
                "OperationalError: connection refused\nsecond line"
            )
        return self.value


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fleet.store.outage"]


def test_the_default_budget_is_five_minutes():
    assert FleetSettings().store_outage_budget_seconds == 300


def test_an_outage_inside_the_budget_is_waited_out_with_one_line_each_way(caplog):
    caplog.set_level(logging.INFO)
    clock = ManualClock(T0)
    call = Flaky(clock, back_at=30)
    assert outage_tolerant_sync(call, budget=300, clock=clock, log_key="app-a") == "state"
    assert call.calls > 3
    # Capped exponential backoff: 0.5, 1, 2, 4 … never above the cap.
    assert clock.sleeps[:5] == [0.5, 1, 2, 4, 8] and max(clock.sleeps) == 10
    lines = outage_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("store unreachable (app-a), waiting up to 300 s")
    assert "second line" not in lines[0]
    assert lines[1].startswith("store back (app-a) after 3")  # ~31.5 s
    assert all(r.exc_info is None for r in caplog.records)


def test_past_the_budget_a_clean_one_line_outage(caplog):
    clock = ManualClock(T0)
    call = Flaky(clock, back_at=10_000)
    with pytest.raises(StoreOutage) as err:
        outage_tolerant_sync(call, budget=300, clock=clock, log_key="app-a")
    assert (clock.now() - T0).total_seconds() == 300  # the last try is at the deadline
    message = str(err.value)
    assert "\n" not in message and "past the outage budget of 300 s (app-a)" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert len(outage_lines(caplog)) == 1
    # A call while the same outage goes on gives up at once (the budget is the outage's)...
    with pytest.raises(StoreOutage):
        outage_tolerant_sync(call, budget=300, clock=clock, log_key="app-a")
    assert (clock.now() - T0).total_seconds() == 300
    # ...the next outage (no try for longer than the backoff cap: maybe back meanwhile) gets a
    # whole budget and logs its own line again.
    clock.advance(30)
    call.back_at = 340
    assert outage_tolerant_sync(call, budget=300, clock=clock, log_key="app-a") == "state"
    assert len(outage_lines(caplog)) == 3


def test_other_errors_pass_through_at_once():
    clock = ManualClock(T0)
    calls = []

    def refused() -> None:
        calls.append(1)
        raise StaleLease("epoch 1 no longer owns app-a")

    with pytest.raises(StaleLease):
        outage_tolerant_sync(refused, budget=300, clock=clock, log_key="app-a")
    assert calls == [1] and clock.sleeps == []


def test_async_calls_of_one_key_log_one_line_per_outage(caplog):
    clock = ManualClock(T0)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    call = Flaky(clock, back_at=20)

    async def read() -> str:  # a coroutine function is awaited, not sent to a thread
        return call()

    async def both() -> list[str]:
        return list(
            await asyncio.gather(
                outage_tolerant(read, budget=300, clock=clock, log_key="cohort", sleep=sleep),
                outage_tolerant(call, budget=300, clock=clock, log_key="cohort", sleep=sleep),
            )
        )

    assert asyncio.run(both()) == ["state", "state"]
    lines = outage_lines(caplog)
    assert [line.split(" (")[0] for line in lines] == ["store unreachable", "store back"]


def test_async_past_the_budget():
    clock = ManualClock(T0)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    with pytest.raises(StoreOutage, match="past the outage budget of 5 s"):
        asyncio.run(
            outage_tolerant(
                Flaky(clock, back_at=60), budget=5, clock=clock, log_key="app-b", sleep=sleep
            )
        )


def test_a_query_the_store_refused_is_not_an_outage():
    clock = ManualClock(T0)
    calls = []

    def missing_migration() -> None:
        calls.append(1)
        raise StoreUnavailable(
            "Supabase at x: rpc fleet_renew_claim failed: PGRST202 … — apply supabase/migrations"
        )

    with pytest.raises(StoreUnavailable, match="PGRST202"):
        outage_tolerant_sync(missing_migration, budget=300, clock=clock, log_key="app-a")
    assert calls == [1] and clock.sleeps == []


def test_which_codes_mean_out_of_reach():
    from fleet.store.refusals import unreachable_code

    for code in ("08006", "08001", "57P01", "57P03", "53300", "PGRST000", "PGRST002"):
        assert unreachable_code(code), code
    for code in (None, "", "42P01", "23505", "P0001", "PGRST202", "42501"):
        assert not unreachable_code(code), code


@pytest.mark.parametrize("outage", [3, 30, 100, 299])
def test_a_call_notices_the_store_is_back_within_the_cap(outage):
    clock = ManualClock(T0)
    assert (
        outage_tolerant_sync(
            Flaky(clock, back_at=outage), budget=300, clock=clock, log_key=f"late-{outage}"
        )
        == "state"
    )
    late = (clock.now() - T0).total_seconds() - outage
    assert 0 <= late <= 10


def test_a_call_joining_an_outage_late_gives_up_with_the_first_waiter():
    """The budget is the outage's, not each call's: the cohort's read of an app that gave up
    does not wait a second budget."""
    from fleet.store.outage import OutageLog

    clock = ManualClock(T0)
    outages = OutageLog()
    down = Flaky(clock, back_at=10_000)
    with pytest.raises(StoreOutage):
        outage_tolerant_sync(down, budget=60, clock=clock, log_key="app-a", outages=outages)
    gave_up = clock.now()
    assert (gave_up - T0).total_seconds() == 60
    with pytest.raises(StoreOutage):
        outage_tolerant_sync(down, budget=60, clock=clock, log_key="cohort", outages=outages)
    assert (clock.now() - gave_up).total_seconds() < 1  # one try, no second budget


def test_an_outage_after_the_store_came_back_gets_a_whole_budget():
    from fleet.store.outage import OutageLog

    clock = ManualClock(T0)
    outages = OutageLog()
    assert outage_tolerant_sync(
        Flaky(clock, 50), budget=60, clock=clock, log_key="a", outages=outages
    )
    clock.advance(1000)  # the store answered; much later it goes down again
    later = clock.now()
    with pytest.raises(StoreOutage):
        outage_tolerant_sync(
            Flaky(clock, back_at=10_000), budget=60, clock=clock, log_key="a", outages=outages
        )
    assert (clock.now() - later).total_seconds() == 60
