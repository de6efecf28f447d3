"""PlannerLease over a real store and a clock moved by hand: one leader at a time, a standby
takes over within one lease of the leader's death, at its next retry after a release."""

from __future__ import annotations

import pytest

from fleet.clock import ManualClock
from fleet.settings import FleetSettings
from fleet.store.leadership import PlannerLease
from fleet.store.sqlite import SQLiteStore
from tests.store_contract import T0


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "fleet.db")
    yield s
    s.close()


def planner(store, holder: str, clock: ManualClock) -> PlannerLease:
    s = FleetSettings()
    return PlannerLease(
        store,
        holder,
        clock,
        lease_seconds=s.planner_lease_seconds,
        renew_seconds=s.planner_renew_seconds,
        retry_seconds=s.planner_retry_seconds,
    )


def test_settings_are_the_issues_figures():
    s = FleetSettings()
    assert (s.planner_lease_seconds, s.planner_renew_seconds) == (15, 10)
    assert s.planner_retry_seconds == 2


def test_one_leader_and_the_leader_keeps_it_by_renewing(store):
    clock = ManualClock(T0)
    a, b = planner(store, "vm-a", clock), planner(store, "vm-b", clock)
    assert a.tick() and not b.tick()
    for _ in range(20):  # 200 s of renewals every 10 s, the standby retrying meanwhile
        clock.advance(a.wake_in())
        assert a.tick() and a.holds()
        assert not b.tick() and not b.holds()
    assert (a.epoch, store.get_lease("planner").holder) == (1, "vm-a")


def test_a_standby_takes_over_within_one_lease_of_the_leaders_death(store):
    clock = ManualClock(T0)
    a, b = planner(store, "vm-a", clock), planner(store, "vm-b", clock)
    assert a.tick()
    last_renewal = clock.now()
    # vm-a dies here (stops ticking); vm-b retries every 2 s.
    while not b.tick():
        clock.advance(b.wake_in())
    waited = (clock.now() - last_renewal).total_seconds()
    assert 15 < waited <= 15 + 2
    assert b.epoch == 2 and b.holds()
    # The old leader wakes up late: its lease ran out by its own clock, and renewing fails.
    assert not a.holds()
    assert not a.renew() and not a.leading


def test_a_released_lease_is_taken_at_the_next_retry(store):
    clock = ManualClock(T0)
    a, b = planner(store, "vm-a", clock), planner(store, "vm-b", clock)
    assert a.tick() and not b.tick()
    clock.advance(1)
    a.release()
    assert not a.leading
    clock.advance(b.wake_in())
    assert b.tick() and b.epoch == 2


def test_renew_must_be_shorter_than_the_lease(store):
    with pytest.raises(ValueError, match="renew_seconds must be below lease_seconds"):
        PlannerLease(store, "vm-a", ManualClock(T0), lease_seconds=10, renew_seconds=10)


def test_fleet_status_shows_the_leader(tmp_home):
    from datetime import timedelta

    from typer.testing import CliRunner

    from fleet.cli import app
    from fleet.clock import utcnow

    tmp_home.mkdir(parents=True)
    store = SQLiteStore(tmp_home / "fleet.db")
    runner = CliRunner()
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "planner: no leader yet" in result.output
    now = utcnow()
    store.acquire_lease("planner", "vm-a:123", now, 15)
    result = runner.invoke(app, ["status"])
    assert "planner: vm-a:123 (epoch 1), lease expires in" in result.output
    store.acquire_lease("planner", "vm-b:7", now + timedelta(seconds=16), 15)
    assert "vm-b:7 (epoch 2)" in runner.invoke(app, ["status"]).output
    store.close()


def test_describe_an_expired_leader():
    from datetime import timedelta

    from fleet.store.base import Lease
    from fleet.store.leadership import describe_leader

    lease = Lease(
        name="planner",
        holder="vm-a",
        epoch=3,
        acquired_at=T0,
        renewed_at=T0,
        expires_at=T0 + timedelta(seconds=15),
    )
    assert describe_leader(lease, T0 + timedelta(seconds=45)) == (
        "planner: none live — last vm-a (epoch 3), expired 30 s ago"
    )
