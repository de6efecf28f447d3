"""ClaimHeartbeat on a real SQLite store, in real (sub-second) time: the claim outlives many
leases while the run lives, is free within one lease after it stops, and a run whose app
was taken learns it at the next beat."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from fleet.clock import SystemClock
from fleet.settings import FleetSettings
from fleet.store.heartbeat import ClaimHeartbeat
from fleet.store.sqlite import SQLiteStore

LEASE, EVERY = 1.0, 0.1  # the 60 s / 20 s of production, scaled down with a wider margin


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "fleet.db")
    s.ensure_apps(["app-a"], SystemClock().now())
    yield s
    s.close()


def heartbeat(store, epoch: int) -> ClaimHeartbeat:
    return ClaimHeartbeat(
        store,
        "app-a",
        epoch,
        clock=SystemClock(),
        lease_seconds=LEASE,
        every_seconds=EVERY,
        outage_budget=5,
    )


def test_settings_are_the_issues_figures():
    s = FleetSettings()
    assert (s.app_lease_seconds, s.app_heartbeat_seconds) == (60, 20)


def test_the_claim_lives_as_long_as_the_run_and_one_lease_after(store):
    clock = SystemClock()
    epoch = store.claim_app("app-a", "host:1", "run-1", clock.now(), LEASE)
    first_lease_until = store.get_state("app-a").lease_until

    async def run() -> ClaimHeartbeat:
        async with heartbeat(store, epoch) as beat:
            for _ in range(6):  # 3 leases of work
                await asyncio.sleep(LEASE / 2)
                assert store.claim_app("app-a", "host:2", "run-2", clock.now(), LEASE) is None
        return beat

    beat = asyncio.run(run())
    assert beat.beats >= 20 and not beat.lost.is_set()
    state = store.get_state("app-a")
    assert state.lease_until - clock.now() <= timedelta(seconds=LEASE)
    # the beats moved the lease: it now ends well after the one the claim first took
    assert state.lease_until - first_lease_until >= timedelta(seconds=2 * LEASE)
    assert (
        store.claim_app("app-a", "host:2", "run-2", clock.now() + timedelta(seconds=LEASE), LEASE)
        == epoch + 1
    )


def test_a_run_whose_app_was_taken_learns_it_at_the_next_beat(store):
    clock = SystemClock()
    epoch = store.claim_app("app-a", "host:1", "run-1", clock.now(), LEASE)

    async def run() -> ClaimHeartbeat:
        async with heartbeat(store, epoch) as beat:
            await asyncio.sleep(EVERY * 2)
            store.reset_app("app-a", clock.now())  # the operator (or a newer epoch) took it
            await asyncio.wait_for(beat.lost.wait(), timeout=EVERY * 20)
        return beat

    assert asyncio.run(run()).lost.is_set()


def test_the_heartbeat_must_beat_inside_the_lease(store):
    with pytest.raises(ValueError, match="app_heartbeat_seconds must be below app_lease_seconds"):
        ClaimHeartbeat(
            store,
            "app-a",
            1,
            clock=SystemClock(),
            lease_seconds=20,
            every_seconds=20,
            outage_budget=5,
        )
