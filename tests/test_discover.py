"""DISCOVER's cohort plan on a real SQLite store: ranking, expansion, max_concurrent, skips."""

from __future__ import annotations

from fleet.clock import ManualClock
from fleet.fleetfile import Commands, FleetFile
from fleet.models import FleetConfig, Stage, Trajectory
from fleet.settings import FleetSettings
from fleet.store.sqlite import SQLiteStore
from fleet.wiring import Components
from flows.cohort import discover
from tests.helpers import HAPPY_PATH

CMD = Commands(skill=["s"], review=["r"], evolve=["e"], ship=["x"])


def comp(tmp_path, n: int = 30, **settings) -> Components:
    fleet = FleetFile(commands=CMD, apps=[{"id": f"app{i:02d}"} for i in range(n)])
    return Components(
        settings=FleetSettings(**settings),
        fleet=fleet,
        store=SQLiteStore(tmp_path / "f.db"),
        dispatcher=None,
        gate=None,
        extractor=None,
        clock=ManualClock(),
    )


def test_first_cohort_is_top_ten_by_reward(tmp_path):
    c = comp(tmp_path, max_concurrent=100)
    c.store.record_trajectory(Trajectory(app_id="app29", run_id="r", outcome="success", reward=0.9))
    c.store.record_trajectory(Trajectory(app_id="app00", run_id="r", outcome="failure", reward=0.0))
    c.store.set_fleet_config(FleetConfig(max_concurrent=100))
    plan = discover(c, None, False, False)
    assert plan.cohort[0] == "app29" and "app00" not in plan.cohort and len(plan.cohort) == 10


def test_expansion_after_each_finished_cohort(tmp_path):
    c = comp(tmp_path)
    assert len(discover(c, None, False, False).cohort) == 10
    c.store.record_cohort("c1", ["app00"], c.clock.now())
    c.store.finish_cohort("c1", c.clock.now())
    assert len(discover(c, None, False, False).cohort) == 20
    c.store.record_cohort("c2", ["app00"], c.clock.now())
    c.store.finish_cohort("c2", c.clock.now())
    assert len(discover(c, None, False, False).cohort) == 30  # 40 asked, the fleet has 30


def test_max_concurrent_counts_apps_in_flight_anywhere(tmp_path):
    c = comp(tmp_path)
    c.store.set_fleet_config(FleetConfig(max_concurrent=3))
    c.store.ensure_apps(["app00", "app01"], c.clock.now())
    c.store.claim_app("app00", "h:1", "r", c.clock.now(), 600)
    plan = discover(c, 5, False, False)
    assert plan.start == ["app01", "app02"]
    assert plan.skipped == {
        "app00": "in flight",
        "app03": "waiting (max_concurrent=3)",
        "app04": "waiting (max_concurrent=3)",
    }
    c.clock.advance(seconds=601)  # the claim expired: no longer in flight
    assert discover(c, 5, False, False).start == ["app00", "app01", "app02"]


def finish(c: Components, app: str, path=HAPPY_PATH) -> None:
    now = c.clock.now()
    c.store.ensure_apps([app], now)
    epoch = c.store.claim_app(app, "h:1", "r", now, 600)
    for stage in path:
        c.store.set_stage(app, stage, epoch, now)
    c.store.release_app(app, epoch)


def test_finished_apps_are_reported_not_restarted_unless_asked(tmp_path):
    c = comp(tmp_path, n=3)
    c.store.set_fleet_config(FleetConfig(max_concurrent=10))
    finish(c, "app00")
    finish(c, "app01", (Stage.FAILED,))
    plan = discover(c, None, False, False)
    assert plan.start == ["app02"]
    assert plan.skipped == {"app00": "already complete", "app01": "failed earlier"}
    assert discover(c, None, False, True).start == ["app01", "app02"]
    assert discover(c, None, True, False).start == ["app00", "app01", "app02"]


def test_finished_apps_do_not_hold_cohort_places(tmp_path):
    """Successes outrank apps without history (reward 1.0 > 0.5): they must not starve the rest."""
    c = comp(tmp_path, n=30)
    c.store.set_fleet_config(FleetConfig(max_concurrent=100))
    for i in range(10):
        finish(c, f"app{i:02d}")
        c.store.record_trajectory(
            Trajectory(app_id=f"app{i:02d}", run_id="r", outcome="success", reward=1.0)
        )
    plan = discover(c, 10, False, False)
    assert plan.start == [f"app{i:02d}" for i in range(10, 20)]
    # the finished apps ranked within the top 10 are still reported as such
    assert plan.skipped == {f"app{i:02d}": "already complete" for i in range(10)}


def test_an_app_run_claims_only_within_max_concurrent(tmp_path):
    """Two cohort runs planned at the same moment both saw a free place: only one claim gets it."""
    from fleet.claim import claim, not_claimed_note

    c = comp(tmp_path, n=3)
    c.store.set_fleet_config(FleetConfig(max_concurrent=1))
    first, second = discover(c, 3, False, False), discover(c, 3, False, True)
    assert first.start == second.start == ["app00"]
    assert claim(c, "app00", "run-a") is not None
    assert claim(c, "app01", "run-b") is None  # the other run's pick must wait
    assert not_claimed_note(c, "app01") == "waiting (max_concurrent=1)"
    assert (
        claim(c, "app00", "run-c") is None and not_claimed_note(c, "app00") == "in flight elsewhere"
    )


def test_a_killed_run_on_this_host_holds_nothing(tmp_path):
    """Its lease has not run out, but its pid is gone: DISCOVER starts the app again at once
    (issue 8: a rerun used to report it `in flight` under the dead pid for the whole lease)."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    c = comp(tmp_path)
    c.store.set_fleet_config(FleetConfig(max_concurrent=3))
    c.store.ensure_apps(["app00"], c.clock.now())
    c.store.claim_app("app00", f"{socket.gethostname()}:{gone}", "r", c.clock.now(), 600)
    plan = discover(c, 3, False, False)
    assert "app00" in plan.start and "app00" not in plan.skipped
