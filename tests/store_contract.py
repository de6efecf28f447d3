"""The Store contract: one suite every backend (SQLite, PostgreSQL, Supabase REST) must pass.

A backend's test module subclasses `StoreContract` and provides a `store` fixture that
yields an empty store.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from fleet.errors import InvalidTransition, StaleLease
from fleet.models import FleetConfig, Stage, Task, Trajectory
from fleet.store.base import WorkEntry, WorkTotal, effect_key

T0 = datetime(2026, 3, 25, 12, 0, tzinfo=UTC)


def task(app_id: str = "app-a", description: str = "Fix the crash on launch.", **kw) -> Task:
    return Task(app_id=app_id, description=description, **kw)


def claim_all_at_once(store_for, apps: list[str], max_in_flight: int) -> list[int | None]:
    """Every app claimed by its own thread, all released at once by a barrier."""
    results: list[int | None] = []
    barrier = threading.Barrier(len(apps))

    def claim(i: int) -> None:
        store = store_for(i)
        barrier.wait()
        results.append(
            store.claim_app(apps[i], f"host:{i}", f"run-{i}", T0, 600, max_in_flight=max_in_flight)
        )

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(apps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def write_state_to_survive(store) -> dict:
    """A stage, an epoch, tasks and a trajectory, for a reopened store to show again."""
    store.ensure_apps(["app-a", "app-b"], T0)
    epoch = store.claim_app("app-a", "host:1", "run-1", T0, 600)
    store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0 + timedelta(seconds=1))
    store.upsert_tasks([task(priority=1), task(description="Add offline mode.", priority=2)], T0)
    store.record_trajectory(
        Trajectory(
            app_id="app-a",
            run_id="run-0",
            pipeline="default",
            outcome="success",
            reward=0.75,
            created_at=T0,
        )
    )
    return {"epoch": epoch, "tasks": [t.key for t in store.list_tasks("app-a")]}


def assert_state_survived(store, written: dict) -> None:
    state = store.get_state("app-a")
    assert state is not None
    assert (state.stage, state.epoch, state.owner) == (
        Stage.SKILL_RUNNING,
        written["epoch"],
        "host:1",
    )
    assert state.stage_started_at == T0 + timedelta(seconds=1)
    assert store.get_state("app-b").stage is Stage.QUEUED
    tasks = store.list_tasks("app-a")
    assert [t.key for t in tasks] == written["tasks"] and len(tasks) == 2
    assert [t.description for t in tasks] == ["Fix the crash on launch.", "Add offline mode."]
    assert [(t.run_id, t.reward) for t in store.list_trajectories("app-a")] == [("run-0", 0.75)]
    # The epoch kept counting: a write from the old claim is still fenced off.
    with pytest.raises(StaleLease):
        store.set_stage("app-a", Stage.SKILL_COMPLETE, written["epoch"] - 1, T0)


class StoreContract:
    @pytest.fixture
    def far_from_utc(self):
        """The process's local zone set 5:30 h away from UTC, so reading a naive time as local
        time would shift it."""
        import os
        import time

        before = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Kolkata"
        time.tzset()
        yield
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()

    # Time ------------------------------------------------------------------------
    def test_a_naive_time_is_read_as_utc_whatever_the_local_zone(self, store, far_from_utc):
        naive = T0.replace(tzinfo=None)
        store.ensure_apps(["app-a"], naive)
        epoch = store.claim_app("app-a", "h", "r", naive, 600)
        state = store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, naive)
        assert state.stage_started_at == T0
        assert state.lease_until == T0 + timedelta(seconds=600)

    # App states ------------------------------------------------------------------
    def test_ensure_apps_creates_queued_states_once(self, store):
        store.ensure_apps(["app-a", "app-b"], T0)
        store.ensure_apps(["app-a"], T0 + timedelta(hours=1))
        states = {s.app_id: s for s in store.list_states()}
        assert set(states) == {"app-a", "app-b"}
        assert states["app-a"].stage is Stage.QUEUED
        assert store.get_state("missing") is None

    def test_claim_is_exclusive_until_released(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "host:1", "run-1", T0, 600)
        assert epoch is not None
        assert store.claim_app("app-a", "host:2", "run-2", T0, 600) is None
        store.release_app("app-a", epoch)
        assert store.claim_app("app-a", "host:2", "run-2", T0, 600) == epoch + 1

    def test_expired_claim_can_be_taken(self, store):
        store.ensure_apps(["app-a"], T0)
        store.claim_app("app-a", "host:1", "run-1", T0, 600)
        assert store.claim_app("app-a", "host:2", "run-2", T0 + timedelta(seconds=599), 600) is None
        assert (
            store.claim_app("app-a", "host:2", "run-2", T0 + timedelta(seconds=601), 600)
            is not None
        )
        assert store.get_state("app-a").owner == "host:2"

    def test_claim_of_vouched_dead_owner_can_be_taken(self, store):
        store.ensure_apps(["app-a"], T0)
        store.claim_app("app-a", "host:1", "run-1", T0, 600)
        assert store.claim_app("app-a", "host:2", "run-2", T0, 600, steal_from="host:1") is not None

    def test_concurrent_claims_have_one_winner(self, store):
        store.ensure_apps(["app-a"], T0)
        results: list[int | None] = []
        barrier = threading.Barrier(8)

        def claim(i: int) -> None:
            barrier.wait()
            results.append(store.claim_app("app-a", f"host:{i}", f"run-{i}", T0, 600))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len([r for r in results if r is not None]) == 1

    def test_claim_respects_max_in_flight_across_all_apps(self, store):
        store.ensure_apps(["app-a", "app-b", "app-c"], T0)
        assert store.claim_app("app-a", "h:1", "r1", T0, 600, max_in_flight=2) is not None
        assert store.claim_app("app-b", "h:2", "r2", T0, 600, max_in_flight=2) is not None
        assert (
            store.claim_app("app-c", "h:3", "r3", T0, 600, max_in_flight=2) is None
        )  # two in flight
        assert store.get_state("app-c").owner is None
        # an expired lease is not in flight; an app's own stale claim does not count against it
        later = T0 + timedelta(seconds=601)
        assert store.claim_app("app-c", "h:3", "r3", later, 600, max_in_flight=2) is not None
        assert store.claim_app("app-a", "h:4", "r4", later, 600, max_in_flight=2) is not None

    def test_concurrent_claims_of_different_apps_never_exceed_max_in_flight(self, store):
        apps = [f"app-{i}" for i in range(6)]
        store.ensure_apps(apps, T0)
        claim_all_at_once(lambda i: store, apps, max_in_flight=2)
        assert sum(1 for s in store.list_states() if s.owner) == 2

    def test_set_stage_follows_transitions_and_records_error(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h", "r", T0, 600)
        state = store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0)
        assert state.stage is Stage.SKILL_RUNNING and state.stage_started_at == T0
        with pytest.raises(InvalidTransition):
            store.set_stage("app-a", Stage.COMPLETE, epoch, T0)
        state = store.set_stage("app-a", Stage.FAILED, epoch, T0, error="insufficient_tasks")
        assert (state.stage, state.error) == (Stage.FAILED, "insufficient_tasks")
        assert store.get_state("app-a").error == "insufficient_tasks"

    def test_set_stage_is_idempotent(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h", "r", T0, 600)
        store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0)
        again = store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0 + timedelta(minutes=5))
        assert again.stage is Stage.SKILL_RUNNING
        assert again.stage_started_at == T0  # a rewrite does not restart the stage clock

    def test_stage_write_from_stale_epoch_is_refused(self, store):
        store.ensure_apps(["app-a"], T0)
        old = store.claim_app("app-a", "h1", "r1", T0, 60)
        new = store.claim_app("app-a", "h2", "r2", T0 + timedelta(minutes=2), 60)
        assert new > old
        with pytest.raises(StaleLease):
            store.set_stage("app-a", Stage.SKILL_RUNNING, old, T0 + timedelta(minutes=2))
        assert store.get_state("app-a").stage is Stage.QUEUED

    def test_a_released_claim_can_no_longer_write(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h1", "r1", T0, 600)
        store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0)
        store.release_app("app-a", epoch)
        with pytest.raises(StaleLease):
            store.set_stage("app-a", Stage.SKILL_COMPLETE, epoch, T0, lease_seconds=600)
        state = store.get_state("app-a")
        assert (state.stage, state.owner, state.lease_until) == (Stage.SKILL_RUNNING, None, None)

    def test_set_stage_renews_lease(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h1", "r1", T0, 60)
        store.set_stage(
            "app-a", Stage.SKILL_RUNNING, epoch, T0 + timedelta(seconds=50), lease_seconds=60
        )
        assert store.claim_app("app-a", "h2", "r2", T0 + timedelta(seconds=90), 60) is None

    def test_reset_returns_app_to_queue_and_fences_old_claim(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h", "r", T0, 600)
        store.set_stage("app-a", Stage.FAILED, epoch, T0, error="boom")
        store.reset_app("app-a", T0)
        state = store.get_state("app-a")
        assert (state.stage, state.error, state.owner) == (Stage.QUEUED, None, None)
        with pytest.raises(StaleLease):
            store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0)

    # Tasks -----------------------------------------------------------------------
    def test_upsert_tasks_never_duplicates(self, store):
        tasks = [task(description=f"Fix bug number {i}.") for i in range(5)]
        assert store.upsert_tasks(tasks, T0) == 5
        assert store.upsert_tasks(tasks + [task(description="Fix bug number 0.")], T0) == 0
        assert len(store.list_tasks("app-a")) == 5

    def test_upsert_updates_priority_and_filters_by_source(self, store):
        store.upsert_tasks([task(priority=4)], T0)
        store.upsert_tasks([task(priority=1)], T0)
        store.upsert_tasks(
            [task(source="adversarial", severity="high", priority=2, file="App/Main.swift")], T0
        )
        skill = store.list_tasks("app-a", source="skill")
        assert [t.priority for t in skill] == [1]
        adversarial = store.list_tasks("app-a", source="adversarial")
        assert adversarial[0].severity == "high" and adversarial[0].file == "App/Main.swift"
        assert store.list_tasks("app-b") == []

    def test_upsert_many_tasks(self, store):
        tasks = [task(description=f"Issue {i}.") for i in range(1200)]
        assert store.upsert_tasks(tasks, T0) == 1200
        assert store.upsert_tasks(tasks, T0) == 0

    # Trajectories ----------------------------------------------------------------
    def test_trajectories_are_idempotent_and_averaged(self, store):
        def traj(run: str, reward: float, app: str = "app-a") -> Trajectory:
            return Trajectory(
                app_id=app,
                run_id=run,
                outcome="success",
                reward=reward,
                durations={"skill": 1.5},
                created_at=T0,
            )

        store.record_trajectory(traj("r1", 1.0))
        store.record_trajectory(traj("r1", 1.0))
        store.record_trajectory(traj("r2", 0.0))
        store.record_trajectory(traj("r1", 0.8, app="app-b"))
        assert store.reward_means(["app-a", "app-b", "app-c"]) == pytest.approx(
            {"app-a": 0.5, "app-b": 0.8}
        )
        [first, _] = store.list_trajectories("app-a")
        assert first.durations == {"skill": 1.5}

    # Config and cohorts ----------------------------------------------------------
    def test_fleet_config_defaults_and_roundtrip(self, store):
        assert store.get_fleet_config() == FleetConfig()
        store.set_fleet_config(FleetConfig(max_concurrent=7))
        assert store.get_fleet_config().max_concurrent == 7

    def test_cohorts_count_only_when_finished(self, store):
        store.record_cohort("c1", ["app-a"], T0)
        store.record_cohort("c1", ["app-a"], T0)
        assert store.completed_cohorts() == 0
        store.finish_cohort("c1", T0)
        store.finish_cohort("c1", T0)
        store.record_cohort("c2", [], T0)
        store.finish_cohort("c2", T0)
        assert store.completed_cohorts() == 1

    # Heartbeat renewal -----------------------------------------------------------
    def test_renew_claim_extends_the_lease_without_touching_the_stage(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h1", "r1", T0, 60)
        store.set_stage("app-a", Stage.SKILL_RUNNING, epoch, T0)
        assert store.renew_claim("app-a", epoch, T0 + timedelta(seconds=50), 60) is True
        state = store.get_state("app-a")
        assert state.lease_until == T0 + timedelta(seconds=110)
        assert (state.stage, state.stage_started_at) == (Stage.SKILL_RUNNING, T0)
        assert state.epoch == epoch
        # Past the first lease but inside the renewed one: still held.
        assert store.claim_app("app-a", "h2", "r2", T0 + timedelta(seconds=100), 60) is None

    def test_renew_claim_is_fenced(self, store):
        store.ensure_apps(["app-a", "app-b"], T0)
        old = store.claim_app("app-a", "h1", "r1", T0, 60)
        new = store.claim_app("app-a", "h2", "r2", T0 + timedelta(seconds=61), 60)
        assert store.renew_claim("app-a", old, T0 + timedelta(seconds=62), 60) is False
        assert store.get_state("app-a").lease_until == T0 + timedelta(seconds=121)
        store.release_app("app-a", new)
        assert store.renew_claim("app-a", new, T0 + timedelta(seconds=63), 60) is False
        assert store.get_state("app-a").lease_until is None
        assert store.renew_claim("app-b", 0, T0, 60) is False  # never claimed
        assert store.renew_claim("app-z", 1, T0, 60) is False  # unknown app

    # Effects ledger --------------------------------------------------------------
    def test_record_effect_keeps_the_first_value(self, store):
        store.ensure_apps(["app-a"], T0)
        epoch = store.claim_app("app-a", "h1", "r1", T0, 60)
        key = effect_key("app-a", "skill", 1)
        assert store.record_effect("app-a", key, "spawn", "task-1", epoch, T0) == "task-1"
        # A retried spawn that got a second task id learns the first one.
        assert store.record_effect("app-a", key, "spawn", "task-2", epoch, T0) == "task-1"
        effect = store.get_effect("app-a", key)
        assert (effect.kind, effect.value, effect.epoch) == ("spawn", "task-1", epoch)
        assert effect.created_at == T0
        assert store.get_effect("app-a", effect_key("app-a", "skill", 2)) is None

    def test_a_resumed_run_finds_the_effect_of_the_dead_one(self, store):
        store.ensure_apps(["app-a"], T0)
        dead = store.claim_app("app-a", "host:1", "r1", T0, 60)
        key = effect_key("app-a", "ship", 1)
        store.record_effect("app-a", key, "ship", "ship-task-9", dead, T0)
        resumed = store.claim_app("app-a", "host:2", "r2", T0 + timedelta(seconds=61), 60)
        assert (
            store.record_effect(
                "app-a", key, "ship", "ship-task-10", resumed, T0 + timedelta(seconds=62)
            )
            == "ship-task-9"
        )
        assert store.get_effect("app-a", key).epoch == dead

    def test_record_effect_is_fenced(self, store):
        store.ensure_apps(["app-a"], T0)
        old = store.claim_app("app-a", "h1", "r1", T0, 60)
        store.claim_app("app-a", "h2", "r2", T0 + timedelta(seconds=61), 60)
        with pytest.raises(StaleLease, match="app-a"):
            store.record_effect("app-a", effect_key("app-a", "skill", 1), "spawn", "t", old, T0)
        with pytest.raises(StaleLease):
            store.record_effect("app-z", "k", "spawn", "t", 1, T0)  # unknown app
        assert store.list_effects("app-a") == []

    def test_list_effects_in_order_and_reset_forgets_them(self, store):
        store.ensure_apps(["app-a", "app-b"], T0)
        epoch = store.claim_app("app-a", "h1", "r1", T0, 60)
        other = store.claim_app("app-b", "h1", "r1", T0, 60)
        snapshot = '{"commit": "abc123", "bare": "/srv/snap/app-a.git"}'
        for i, (stage, kind, value) in enumerate(
            [("guard", "snapshot", snapshot), ("skill", "spawn", "t-1"), ("run", "marker", "m-1")]
        ):
            store.record_effect(
                "app-a",
                effect_key("app-a", stage, 1),
                kind,
                value,
                epoch,
                T0 + timedelta(seconds=i),
            )
        store.record_effect("app-b", effect_key("app-b", "skill", 1), "spawn", "t-b", other, T0)
        effects = store.list_effects("app-a")
        assert [(e.kind, e.value) for e in effects] == [
            ("snapshot", snapshot),
            ("spawn", "t-1"),
            ("marker", "m-1"),
        ]
        store.reset_app("app-a", T0 + timedelta(seconds=5))
        assert store.list_effects("app-a") == []
        assert [e.value for e in store.list_effects("app-b")] == ["t-b"]

    # Leadership leases -----------------------------------------------------------
    def test_lease_is_held_renewed_and_taken_over_after_expiry(self, store):
        assert store.get_lease("planner") is None
        assert store.acquire_lease("planner", "vm-a", T0, 15) == 1
        assert store.acquire_lease("planner", "vm-b", T0 + timedelta(seconds=14), 15) is None
        assert store.acquire_lease("planner", "vm-a", T0 + timedelta(seconds=10), 15) == 1  # renew
        lease = store.get_lease("planner")
        assert (lease.holder, lease.epoch, lease.acquired_at) == ("vm-a", 1, T0)
        assert lease.expires_at == T0 + timedelta(seconds=25)
        assert store.acquire_lease("planner", "vm-b", T0 + timedelta(seconds=24), 15) is None
        assert store.acquire_lease("planner", "vm-b", T0 + timedelta(seconds=26), 15) == 2
        # The deposed holder cannot renew, nor release the new holder's lease.
        assert store.acquire_lease("planner", "vm-a", T0 + timedelta(seconds=27), 15) is None
        assert store.release_lease("planner", "vm-a", 1, T0 + timedelta(seconds=27)) is False
        assert store.get_lease("planner").holder == "vm-b"

    def test_released_lease_is_free_at_once(self, store):
        epoch = store.acquire_lease("planner", "vm-a", T0, 15)
        assert store.release_lease("planner", "vm-a", epoch, T0 + timedelta(seconds=1)) is True
        assert store.acquire_lease("planner", "vm-b", T0 + timedelta(seconds=1), 15) == epoch + 1
        assert store.acquire_lease("other", "vm-a", T0, 15) == 1  # leases are per name

    # Cost and work ledger --------------------------------------------------------
    def test_work_ledger_sums_per_app_run_and_account(self, store):
        def entry(n: int, app: str, run: str, account: str, **kw) -> WorkEntry:
            return WorkEntry(
                id=f"try-{n}",
                app_id=app,
                run_id=run,
                stage="skill",
                task_key=kw.pop("task_key", "skill/1/x"),
                account=account,
                outcome=kw.pop("outcome", "answered"),
                wall_seconds=kw.pop("wall", 10.0),
                recorded_at=T0 + timedelta(seconds=n),
                **kw,
            )

        store.record_work(entry(1, "app-a", "c1", "acct-1", outcome="failed", wall=2.5))
        store.record_work(entry(2, "app-a", "c1", "acct-1", tokens_in=100, cost_usd=0.25))
        store.record_work(entry(2, "app-a", "c1", "acct-1", tokens_in=100, cost_usd=0.25))
        store.record_work(
            entry(3, "app-a", "c1", "acct-2", task_key="review/1/y", tokens_out=7, cost_usd=1.5)
        )
        store.record_work(entry(4, "app-b", "c2", "acct-2"))
        by_app = {t.key: t for t in store.work_totals("app")}
        assert by_app["app-a"] == WorkTotal(
            key="app-a",
            tasks=2,
            attempts=3,
            wall_seconds=22.5,
            tokens_in=100,
            tokens_out=7,
            cost_usd=1.75,
        )
        assert by_app["app-b"].cost_usd is None and by_app["app-b"].tokens_in is None
        by_run = {t.key: (t.attempts, t.cost_usd) for t in store.work_totals("run")}
        assert by_run == {"c1": (3, 1.75), "c2": (1, None)}
        by_account = {t.key: t.cost_usd for t in store.work_totals("account")}
        assert by_account == {"acct-1": 0.25, "acct-2": 1.5}
        recent = store.work_totals("app", since=T0 + timedelta(seconds=3))
        assert [(t.key, t.attempts) for t in recent] == [("app-a", 1), ("app-b", 1)]
        of_c2 = store.work_totals("app", run_id="c2")
        assert [(t.key, t.attempts, t.wall_seconds) for t in of_c2] == [("app-b", 1, 10.0)]

    def test_open_cohort_spend_counts_since_the_last_finished_cohort(self, store):
        def spend(n: int, cost: float) -> None:
            store.record_work(
                WorkEntry(
                    id=f"w{n}",
                    app_id="app-a",
                    run_id="c",
                    stage="skill",
                    task_key=f"skill/{n}/x",
                    outcome="answered",
                    wall_seconds=1,
                    cost_usd=cost,
                    recorded_at=T0 + timedelta(minutes=n),
                )
            )

        assert store.open_cohort_spend() == 0.0
        spend(1, 2.0)
        spend(2, 3.0)
        assert store.open_cohort_spend() == 5.0
        store.record_cohort("c1", ["app-a"], T0)
        store.finish_cohort("c1", T0 + timedelta(minutes=1, seconds=30))
        assert store.open_cohort_spend() == 3.0
        store.record_cohort("c2", [], T0)  # an empty cohort does not close the window
        store.finish_cohort("c2", T0 + timedelta(minutes=5))
        assert store.open_cohort_spend() == 3.0
