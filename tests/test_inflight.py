"""One definition of "in flight": a dead local run's app is free at once, a live remote
run's app is held until its (short) lease runs out."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta

from fleet.clock import ManualClock
from fleet.inflight import dead_on_this_host, in_flight, owner_id, steal_from
from fleet.models import EvolutionState
from fleet.settings import FleetSettings
from tests.store_contract import T0


def held(owner: str | None, clock: ManualClock, lease_seconds: float) -> EvolutionState:
    lease_until = clock.now() + timedelta(seconds=lease_seconds)
    return EvolutionState(app_id="app-a", owner=owner, lease_until=lease_until if owner else None)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_app_is_not_in_flight_even_with_its_lease_live():
    clock = ManualClock(T0)
    owner = f"{socket.gethostname()}:{dead_pid()}"
    state = held(owner, clock, FleetSettings().app_lease_seconds)
    assert not in_flight(state, clock.now(), dead_on_this_host)
    assert steal_from(state, clock.now(), dead_on_this_host) == owner


def test_a_live_owner_on_another_host_is_in_flight_until_its_lease_expires():
    clock = ManualClock(T0)
    lease = FleetSettings().app_lease_seconds
    assert lease == 60
    state = held("other-host.example:4242", clock, lease)
    assert in_flight(state, clock.now(), dead_on_this_host)
    assert steal_from(state, clock.now(), dead_on_this_host) is None
    clock.advance(lease)  # lease_until == now: still held (the store frees it when < now)
    assert in_flight(state, clock.now(), dead_on_this_host)
    clock.advance(0.001)
    assert not in_flight(state, clock.now(), dead_on_this_host)
    assert steal_from(state, clock.now(), dead_on_this_host) is None  # expired: free anyway


def test_this_process_and_unowned_apps():
    clock = ManualClock(T0)
    assert in_flight(held(owner_id(), clock, 60), clock.now(), dead_on_this_host)
    assert not in_flight(held(None, clock, 60), clock.now(), dead_on_this_host)
    # The predicate is injected: DISCOVER and the claim ask the same one.
    assert not in_flight(held("x:1", clock, 60), clock.now(), lambda owner: True)


def test_the_claim_takes_a_dead_runs_app_at_once_and_waits_out_a_live_one(tmp_path):
    from fleet.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "fleet.db")
    clock = ManualClock(T0)
    lease = FleetSettings().app_lease_seconds
    store.ensure_apps(["app-a", "app-b"], clock.now())
    store.claim_app("app-a", f"{socket.gethostname()}:{dead_pid()}", "r1", clock.now(), lease)
    store.claim_app("app-b", "other-host.example:4242", "r1", clock.now(), lease)
    clock.advance(1)
    taken = {}
    for app in ("app-a", "app-b"):
        state = store.get_state(app)
        victim = steal_from(state, clock.now(), dead_on_this_host)
        taken[app] = store.claim_app(app, owner_id(), "r2", clock.now(), lease, steal_from=victim)
    assert taken["app-a"] == 2 and taken["app-b"] is None
    clock.advance(lease)  # the remote owner stopped renewing: free within one lease
    state = store.get_state("app-b")
    assert not in_flight(state, clock.now(), dead_on_this_host)
    assert store.claim_app("app-b", owner_id(), "r2", clock.now(), lease) == 2
    store.close()
