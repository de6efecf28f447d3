"""The immune feed on a real store: task outcomes → observations → tiers the claim honours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleet.clock import ManualClock
from fleet.mesh.immune import ImmunePolicy, Subject, Tier
from fleet.mesh.immune_feed import observations, run_cycle
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.mesh.watchdog import watchdog_cycle
from fleet.settings import FleetSettings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P = ImmunePolicy()


def join(store, *machines: str, now: datetime) -> None:
    for m in machines:
        store.heartbeat(MachineIdentity(machine_id=m, mesh_id="m"), now, None, [])


def run_one(store, machine: str, now: datetime, ok: bool, error: str = "exit 1") -> str | None:
    tasks = store.claim(machine, now)
    if not tasks:
        return None
    t = tasks[0]
    store.transition(t.task_id, machine, TaskStatus.INJECTED, now, pane_id="%1")
    store.transition(
        t.task_id,
        machine,
        TaskStatus.DONE if ok else TaskStatus.FAILED,
        now,
        **({"output": "ok"} if ok else {"error": error}),
    )
    return t.task_id


def test_events_become_observations_of_each_subject():
    rows = [
        {
            "event": "done",
            "at": T0,
            "machine_id": "m1",
            "task_id": "a",
            "task_type": "skill:1",
            "detail": {"pane_id": "%1"},
        },
        {
            "event": "failed",
            "at": T0,
            "machine_id": "m1",
            "task_id": "b",
            "task_type": "skill:1",
            "detail": {"pane_id": "%2", "error": "Too Many Requests (429)"},
        },
        {
            "event": "queued",
            "at": T0,
            "machine_id": "m2",
            "task_id": "c",
            "task_type": "skill:1",
            "detail": {"reason": "orphaned"},
        },
        {
            "event": "queued",
            "at": T0,
            "machine_id": None,
            "task_id": "d",
            "task_type": "x",
            "detail": {"kind": "skill"},
        },
        {
            "event": "PaneRespawned",
            "at": T0,
            "machine_id": "m1",
            "task_id": None,
            "task_type": None,
            "detail": {"pane_id": "%3"},
        },
    ]
    got = [(str(o.subject), o.outcome) for o in observations(rows)]
    assert got == [
        ("machine:m1", "success"),
        ("pane:m1/%1", "success"),
        ("task_type:skill:1", "success"),
        ("machine:m2", "failure"),
        ("task_type:skill:1", "failure"),
        ("pane:m1/%3", "failure"),
    ]


def test_a_flaky_machine_is_quarantined_and_gets_less_work(any_store):
    store = any_store
    clock = ManualClock(T0)
    machines = [f"m{i}" for i in range(10)]
    join(store, *machines, now=clock.now())
    for i in range(200):
        store.enqueue(
            "skill", ["claude", "-p", f"/evolve app-{i % 7}"], clock.now(), task_id=f"t{i:03d}"
        )
    for _ in range(5):  # m0 fails everything; the others succeed
        for m in machines:
            run_one(store, m, clock.now(), ok=(m != "m0"))
        clock.advance(10)
    cycle = run_cycle(store, clock.now(), P)
    state = cycle.states[Subject.machine("m0")]
    assert state.tier == Tier.HARD
    assert all(
        cycle.states[Subject.machine(m)].tier == Tier.INNATE
        for m in machines[1:]
        if Subject.machine(m) in cycle.states
    )
    assert store.claim("m0", clock.now()) == []
    # The cursor moved: the same events are not counted twice.
    again = run_cycle(store, clock.now(), P)
    assert again.observed == 0 and again.states[Subject.machine("m0")].ejections == 1


def test_the_probe_releases_a_machine_that_recovered(any_store):
    store = any_store
    clock = ManualClock(T0)
    join(store, "m0", "m1", "m2", now=clock.now())
    for i in range(20):
        store.enqueue("skill", ["x", str(i)], clock.now(), task_id=f"t{i:03d}")
    for _ in range(5):
        run_one(store, "m0", clock.now(), ok=False)
        clock.advance(1)
    run_cycle(store, clock.now(), P)
    clock.advance(P.exclusion(1).total_seconds())
    probe = run_one(store, "m0", clock.now(), ok=True)
    assert probe is not None
    cycle = run_cycle(store, clock.now(), P)
    assert cycle.states[Subject.machine("m0")].tier == Tier.INNATE
    assert [(e["action"], e["tier"]) for e in store.immune_events("machine:m0")] == [
        ("quarantine", 1),
        ("quarantine", 2),
        ("release", 0),
    ]


def test_the_watchdog_reports_quarantines(any_store):
    store = any_store
    clock = ManualClock(T0)
    join(store, "m0", "m1", "m2", now=clock.now())
    for i in range(10):
        store.enqueue("skill", ["x", str(i)], clock.now(), task_id=f"t{i:03d}")
    for _ in range(3):
        run_one(store, "m0", clock.now(), ok=False)
    report = watchdog_cycle(store, clock.now(), FleetSettings(), None)
    # Only m0 ran this task family, on one pane: all three look guilty until others succeed.
    assert [q["subject"] for q in report.quarantines][:2] == ["machine:m0", "pane:m0/%1"]
    assert report.summary()["quarantined"] == 3
    assert {"subject": "machine:m0", "action": "quarantine", "tier": 1} in [
        {k: a[k] for k in ("subject", "action", "tier")} for a in report.immune_actions
    ]


def test_a_rate_limited_failure_is_not_held_against_anyone(any_store):
    store = any_store
    join(store, "m0", "m1", "m2", now=T0)
    for i in range(5):
        store.enqueue("skill", ["x", str(i)], T0, task_id=f"t{i}")
    for _ in range(5):
        run_one(store, "m0", T0, ok=False, error="Claude usage limit reached|1772370000")
    cycle = run_cycle(store, T0 + timedelta(seconds=1), P)
    assert cycle.quarantined() == []


def test_the_watchdog_reports_the_mesh_metabolism_and_its_pace(any_store):
    store = any_store
    join(store, "m0", now=T0)
    for i in range(6):
        store.enqueue("hydra", ["claude", "-p", f"/meta:hydra app-{i}"], T0, task_id=f"h{i}")
        run_one(store, "m0", T0, ok=True)
    report = watchdog_cycle(store, T0, FleetSettings(), None)
    assert 0 < report.metabolism["metabolism"] <= 1 and report.metabolism["fitness"] == 1.0
    assert 30 <= report.metabolism["pace_seconds"] < 300
    assert report.summary()["pace_seconds"] == report.metabolism["pace_seconds"]


def test_correctives_that_worked_are_remembered_mesh_wide(any_store):
    store = any_store
    join(store, "m0", "m1", "m2", now=T0)
    for i in range(4):
        store.enqueue("skill", ["x", str(i)], T0, task_id=f"t{i}")
    run_one(store, "m0", T0, ok=False, error="exit 1")
    run_one(store, "m0", T0 + timedelta(seconds=5), ok=True)
    run_cycle(store, T0 + timedelta(seconds=10), P)
    learned = {(a.corrective, a.successes) for a in store.antibodies()}
    assert ("requeue_elsewhere", 1) in learned and ("respawn_pane", 1) in learned
