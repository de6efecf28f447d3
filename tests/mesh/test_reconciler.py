"""The reconciler's SQL on both backends: rule boundaries, dead-letters, one ReconcilerRun per
cycle, and agreement with the pure rules of fleet/mesh/rules.py on generated rows."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from fleet.clock import ManualClock
from fleet.mesh import rules
from fleet.mesh.pg_store import PgMeshStore
from fleet.mesh.sqlite_store import SQLiteMeshStore, _ts
from fleet.mesh.store import MachineHealth, MachineIdentity, QueuedTask, ReconcileCounts, TaskStatus
from fleet.settings import FleetSettings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
S = FleetSettings()
TH = rules.Thresholds.from_settings(S)
# A canary policy's thresholds (a machine on a trial): tighter orphan, looser stuck.
CANARY = rules.Thresholds(300.0, 2400.0, TH.expiry_seconds, TH.max_attempts)


@pytest.fixture
def store(any_store):
    return any_store


def reconcile(store, now, by_machine=None) -> ReconcileCounts:
    return store.reconcile(
        now,
        orphan_seconds=TH.orphan_seconds,
        stuck_seconds=TH.stuck_seconds,
        expiry_seconds=TH.expiry_seconds,
        max_attempts=TH.max_attempts,
        by_machine=by_machine,
    )


def ident(machine_id: str) -> MachineIdentity:
    return MachineIdentity(machine_id=machine_id, mesh_id="mesh-test")


def claimed_task(store, clock: ManualClock, task_id: str, machine: str = "mac1") -> None:
    if machine not in {m.machine_id for m in store.machines()}:
        store.heartbeat(ident(machine), clock.now(), None, [])  # only registered machines claim
    store.enqueue("skill", ["x"], clock.now(), task_id=task_id)
    [t] = store.claim(machine, clock.now())
    assert t.task_id == task_id


# Orphaned claims -----------------------------------------------------------------------
def test_orphaned_claim_is_requeued_only_after_exactly_ten_minutes(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    claimed_task(store, clock, "o1")
    # Exactly 10 min: not yet (the rule is strict), with the claimer's heartbeat 10 min old.
    assert reconcile(store, T0 + timedelta(seconds=S.orphan_claim_seconds)).orphaned_requeued == 0
    assert store.get_task("o1").status is TaskStatus.CLAIMED
    counts = reconcile(store, T0 + timedelta(seconds=S.orphan_claim_seconds) + US)
    assert counts == ReconcileCounts(orphaned_requeued=1)
    task = store.get_task("o1")
    assert (task.status, task.attempts, task.claimed_by) == (TaskStatus.QUEUED, 1, None)
    last = store.events("o1")[-1]
    assert (last.event, last.machine_id, last.detail) == (
        "queued",
        "mac1",
        {"reason": "orphaned", "attempts": 1},
    )


def test_a_claim_with_a_live_claimer_or_recent_progress_is_not_orphaned(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    claimed_task(store, clock, "beating", "mac1")
    claimed_task(store, clock, "progressing", "mac3")  # mac3 heartbeats at T0 only
    late = T0 + timedelta(seconds=S.orphan_claim_seconds) + timedelta(minutes=1)
    store.heartbeat(ident("mac1"), late - timedelta(minutes=1), None, ["beating"])
    store.progress("progressing", "mac3", late - timedelta(minutes=1))
    assert reconcile(store, late).orphaned_requeued == 0
    # Silence on both fronts for 10 min + 1 µs: both are orphaned.
    counts = reconcile(
        store, late - timedelta(minutes=1) + timedelta(seconds=S.orphan_claim_seconds) + US
    )
    assert counts.orphaned_requeued == 2


# Stuck injections ----------------------------------------------------------------------
def test_stuck_injection_is_requeued_after_fifteen_minutes_without_pane_progress(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    claimed_task(store, clock, "s1")
    store.transition("s1", "mac1", TaskStatus.INJECTED, clock.advance(60), pane_id="%1")
    store.progress("s1", "mac1", clock.advance(60))
    last_progress = clock.now()
    edge = last_progress + timedelta(seconds=S.stuck_injection_seconds)
    # The claimer keeps heartbeating: liveness is not the question, pane progress is.
    store.heartbeat(ident("mac1"), edge, None, ["s1"])
    assert reconcile(store, edge).stuck_requeued == 0
    assert reconcile(store, edge + US) == ReconcileCounts(stuck_requeued=1)
    task = store.get_task("s1")
    assert (task.status, task.attempts, task.pane_id) == (TaskStatus.QUEUED, 1, None)
    assert store.events("s1")[-1].detail["reason"] == "stuck"


def test_running_tasks_of_a_live_machine_with_pane_progress_are_left_alone(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    claimed_task(store, clock, "r1")
    store.transition("r1", "mac1", TaskStatus.RUNNING, clock.now())
    for _ in range(16):  # four hours of heartbeats and pane progress every 15 min
        store.heartbeat(ident("mac1"), clock.advance(S.stuck_injection_seconds), None, ["r1"])
        store.progress("r1", "mac1", clock.now())
        assert reconcile(store, clock.now()) == ReconcileCounts()
    assert store.get_task("r1").status is TaskStatus.RUNNING


def test_running_task_of_a_silent_claimer_is_orphaned_after_ten_minutes(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    claimed_task(store, clock, "r2")
    store.transition("r2", "mac1", TaskStatus.INJECTED, clock.advance(1), pane_id="%1")
    store.transition("r2", "mac1", TaskStatus.RUNNING, clock.advance(1))
    edge = clock.now() + timedelta(
        seconds=S.orphan_claim_seconds
    )  # mac1 crashed: no beat, no progress
    assert reconcile(store, edge) == ReconcileCounts()
    assert reconcile(store, edge + US) == ReconcileCounts(orphaned_requeued=1)
    task = store.get_task("r2")
    assert (task.status, task.attempts, task.claimed_by) == (TaskStatus.QUEUED, 1, None)
    assert store.events("r2")[-1].detail == {"reason": "orphaned", "attempts": 1}


def test_running_task_without_pane_progress_is_stuck_then_dead_lettered(store):
    clock = ManualClock(T0)
    store.enqueue("skill", ["frozen"], clock.now(), task_id="r3")
    outcomes = []
    for _ in range(S.max_task_attempts + 1):
        store.heartbeat(ident("mac1"), clock.now(), None, [])
        [t] = store.claim("mac1", clock.now())
        store.transition("r3", "mac1", TaskStatus.INJECTED, clock.now(), pane_id="%1")
        store.transition("r3", "mac1", TaskStatus.RUNNING, clock.advance(5))
        edge = clock.now() + timedelta(seconds=S.stuck_injection_seconds)
        # The claimer keeps heartbeating: its pane froze, the machine did not.
        store.heartbeat(ident("mac1"), edge, None, ["r3"])
        assert reconcile(store, edge) == ReconcileCounts()
        counts = reconcile(store, clock.advance(S.stuck_injection_seconds + 1e-6))
        outcomes.append((counts.stuck_requeued, counts.dead_lettered))
    assert outcomes == [(1, 0)] * S.max_task_attempts + [(0, 1)]
    task = store.get_task("r3")
    assert (task.status, task.attempts) == (TaskStatus.DEAD_LETTER, S.max_task_attempts + 1)
    assert "(last: stuck)" in task.error


# Expiry --------------------------------------------------------------------------------
def test_unfinished_tasks_expire_after_exactly_a_day(store):
    clock = ManualClock(T0)
    store.enqueue("skill", ["q"], clock.now(), task_id="queued-old")
    claimed_task(store, clock, "claimed-old")
    store.enqueue("skill", ["d"], clock.now(), task_id="done-old")
    store.heartbeat(ident("mac3"), clock.now(), None, [])
    [d] = store.claim("mac3", clock.now())
    store.transition(d.task_id, "mac3", TaskStatus.DONE, clock.now())
    edge = T0 + timedelta(seconds=S.task_expiry_seconds)
    assert reconcile(store, edge).expired == 0
    # Expiry wins over the orphan rule: a day-old orphan expires, it is not retried.
    counts = reconcile(store, edge + US)
    assert counts == ReconcileCounts(expired=2)
    assert {t: store.get_task(t).status for t in ("queued-old", "claimed-old", "done-old")} == {
        "queued-old": TaskStatus.EXPIRED,
        "claimed-old": TaskStatus.EXPIRED,
        "done-old": TaskStatus.DONE,
    }
    assert store.get_task("claimed-old").finished_at == edge + US


# Dead letters --------------------------------------------------------------------------
def test_a_task_failing_more_than_max_attempts_is_dead_lettered(store):
    clock = ManualClock(T0)
    store.enqueue("skill", ["poison"], clock.now(), task_id="p")
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    outcomes = []
    for _ in range(S.max_task_attempts + 1):
        [t] = store.claim("mac1", clock.now())  # mac1 heartbeats once only: every claim orphans
        counts = reconcile(store, clock.advance(S.orphan_claim_seconds + 1))
        outcomes.append((counts.orphaned_requeued, counts.dead_lettered))
    assert outcomes == [(1, 0)] * S.max_task_attempts + [(0, 1)]
    task = store.get_task("p")
    assert (task.status, task.attempts) == (TaskStatus.DEAD_LETTER, S.max_task_attempts + 1)
    assert "dead-lettered after 4 failed attempts" in task.error
    assert store.claim("mac1", clock.now()) == []
    assert store.queue_stats(clock.now())["dead_letter"] == 1
    assert store.events("p")[-1].event == "dead_letter"


def test_claims_of_a_down_machine_are_requeued_by_the_safety_net(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    store.mark_down("mac1", clock.now(), max_attempts=3)
    # A claim that slipped in while the machine was being declared down (a race the
    # store cannot fully exclude without locking heartbeats) is taken back next cycle.
    store.enqueue("skill", ["x"], clock.now(), task_id="slipped")
    import sqlite3

    if isinstance(store, SQLiteMeshStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "UPDATE mesh_task_queue SET status = 'running', claimed_by = 'mac1', "
                "claimed_at = ? WHERE task_id = 'slipped'",
                (_ts(clock.now()),),
            )
    else:
        import psycopg

        with psycopg.connect(store.conninfo.get_secret_value(), autocommit=True) as conn:
            conn.execute(
                "UPDATE mesh_task_queue SET status = 'running', claimed_by = 'mac1', "
                "claimed_at = %s WHERE task_id = 'slipped'",
                (clock.now(),),
            )
    assert reconcile(store, clock.advance(1)) == ReconcileCounts(dead_machine_claims_requeued=1)
    assert store.get_task("slipped").status is TaskStatus.QUEUED


# One event per cycle -------------------------------------------------------------------
def test_every_cycle_appends_exactly_one_reconciler_run_event_with_its_counts(store):
    clock = ManualClock(T0)
    claimed_task(store, clock, "a")
    claimed_task(store, clock, "b")
    first = reconcile(store, clock.advance(S.orphan_claim_seconds + 1))
    second = reconcile(store, clock.advance(60))  # the deployment runs every 60 s
    runs = store.events(event="ReconcilerRun")
    assert len(runs) == 2
    assert [ReconcileCounts(**r.detail) for r in runs] == [first, second]
    assert first.orphaned_requeued == 2 and second == ReconcileCounts()
    assert all(r.task_id is None for r in runs)


# Agreement with the pure rules ---------------------------------------------------------
def _random_world(rng: random.Random, now: datetime, n_tasks: int = 300):
    """Rows clustered around every boundary, so a strict/loose mismatch cannot hide."""
    marks = [TH.orphan_seconds, TH.stuck_seconds, TH.expiry_seconds, 60.0, 0.0]
    marks += [CANARY.orphan_seconds, CANARY.stuck_seconds]

    def ago() -> datetime:
        base = rng.choice(marks)
        jitter = rng.choice([-1e-6, 0.0, 1e-6, -30.0, 30.0, rng.uniform(-3600, 3600)])
        return now - timedelta(seconds=max(0.0, base + jitter))

    statuses = ["alive", "suspect", "down", "left"]
    machines = [
        MachineHealth(
            machine_id=f"m{i}",
            mesh_id="mesh-test",
            role="worker",
            generation=1,
            last_heartbeat=ago(),
            status=rng.choice(statuses),
        )
        for i in range(6)
    ]
    claimers = [m.machine_id for m in machines] + ["ghost"]  # ghost never heartbeated
    tasks = []
    for i in range(n_tasks):
        status = rng.choice(list(TaskStatus))
        active = status in rules.ACTIVE_STATUSES
        claimed_at = ago() if active else None
        progress_at = ago() if active and rng.random() < 0.6 else None
        tasks.append(
            QueuedTask(
                task_id=f"g{i:04d}",
                kind="skill",
                command=["x"],
                status=status,
                attempts=rng.randint(0, TH.max_attempts + 1),
                created_at=ago(),
                claimed_by=rng.choice(claimers) if active else None,
                claimed_at=claimed_at,
                progress_at=progress_at,
            )
        )
    return machines, tasks


def _load(store, machines: list[MachineHealth], tasks: list[QueuedTask]) -> None:
    if isinstance(store, SQLiteMeshStore):
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            conn.executemany(
                "INSERT INTO mesh_health (machine_id, mesh_id, role, generation, last_heartbeat, "
                "status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        m.machine_id,
                        m.mesh_id,
                        m.role,
                        1,
                        _ts(m.last_heartbeat),
                        m.status,
                        _ts(m.last_heartbeat),
                    )
                    for m in machines
                ],
            )
            conn.executemany(
                "INSERT INTO mesh_task_queue (task_id, kind, command, status, attempts, "
                "claimed_by, created_at, claimed_at, progress_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        t.task_id,
                        t.kind,
                        json.dumps(t.command),
                        t.status.value,
                        t.attempts,
                        t.claimed_by,
                        _ts(t.created_at),
                        _ts(t.claimed_at),
                        _ts(t.progress_at),
                    )
                    for t in tasks
                ],
            )
    else:
        import psycopg
        from psycopg.types.json import Jsonb

        with (
            psycopg.connect(store.conninfo.get_secret_value(), autocommit=True) as conn,
            conn.cursor() as cur,
        ):
            cur.executemany(
                "INSERT INTO mesh_health (machine_id, mesh_id, role, generation, last_heartbeat, "
                "status, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        m.machine_id,
                        m.mesh_id,
                        m.role,
                        1,
                        m.last_heartbeat,
                        m.status,
                        m.last_heartbeat,
                    )
                    for m in machines
                ],
            )
            cur.executemany(
                "INSERT INTO mesh_task_queue (task_id, kind, command, status, attempts, "
                "claimed_by, created_at, claimed_at, progress_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        t.task_id,
                        t.kind,
                        Jsonb(t.command),
                        t.status.value,
                        t.attempts,
                        t.claimed_by,
                        t.created_at,
                        t.claimed_at,
                        t.progress_at,
                    )
                    for t in tasks
                ],
            )


@pytest.mark.parametrize("canary", [False, True], ids=["one-policy", "canary-machines"])
@pytest.mark.parametrize("seed", [1, 2])
def test_sql_agrees_with_the_pure_rules_on_generated_rows(store, seed, canary):
    """With `canary`, machines m1, m2 and ghost run a policy of their own (by_machine)."""
    by_machine = dict.fromkeys(("m1", "m2", "ghost"), CANARY) if canary else None
    rng = random.Random(seed)
    now = T0 + timedelta(days=3)
    machines, tasks = _random_world(rng, now)
    _load(store, machines, tasks)
    by_id = {m.machine_id: m for m in machines}

    expected_status: dict[str, tuple[TaskStatus, int]] = {}
    expected = ReconcileCounts()
    for t in tasks:
        verdict = rules.classify(t, by_id, now, TH, by_machine)
        status, attempts = (
            rules.outcome(t, verdict, TH.max_attempts) if verdict else (t.status, t.attempts)
        )
        expected_status[t.task_id] = (status, attempts)
        if verdict is rules.Verdict.EXPIRED:
            expected.expired += 1
        elif verdict and status is TaskStatus.DEAD_LETTER:
            expected.dead_lettered += 1
        elif verdict is rules.Verdict.ORPHANED:
            expected.orphaned_requeued += 1
        elif verdict is rules.Verdict.STUCK:
            expected.stuck_requeued += 1
        elif verdict is rules.Verdict.MACHINE_DOWN:
            expected.dead_machine_claims_requeued += 1
    # The generated world exercises every rule, so agreement is not vacuous.
    assert min(expected.model_dump().values()) > 0, expected

    assert reconcile(store, now, by_machine) == expected
    got = {
        t.task_id: (store.get_task(t.task_id).status, store.get_task(t.task_id).attempts)
        for t in tasks
    }
    assert got == expected_status
    # A second cycle at the same instant finds nothing left to do.
    assert reconcile(store, now, by_machine) == ReconcileCounts()


def test_concurrent_reconcilers_never_move_a_row_twice(store, tmp_path):
    import threading

    clock = ManualClock(T0)
    for i in range(200):
        store.enqueue("skill", ["x"], clock.now(), task_id=f"c{i:03d}")
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    assert len(store.claim("mac1", clock.now(), limit=200)) == 200
    later = clock.advance(S.orphan_claim_seconds + 1)
    if isinstance(store, SQLiteMeshStore):
        others = [SQLiteMeshStore(store.path) for _ in range(3)]
    else:
        others = [PgMeshStore(store.conninfo) for _ in range(3)]
    results: list[ReconcileCounts] = []
    start = threading.Barrier(len(others))

    def run(s) -> None:
        start.wait()
        results.append(reconcile(s, later))

    threads = [threading.Thread(target=run, args=(s,)) for s in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in others:
        s.close()
    assert sum(r.orphaned_requeued for r in results) == 200
    assert len(store.events(event="ReconcilerRun")) == 3
    requeues = [e for e in store.events(event="queued") if e.detail.get("reason") == "orphaned"]
    assert len(requeues) == 200
    assert {store.get_task(f"c{i:03d}").attempts for i in range(200)} == {1}


def test_a_row_held_by_another_session_is_skipped_not_waited_for(mesh_pg_url):
    import psycopg

    with psycopg.connect(mesh_pg_url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE mesh_task_events, mesh_task_queue, mesh_health, mesh_pane_state "
            "RESTART IDENTITY"
        )
    store = PgMeshStore(mesh_pg_url, statement_timeout_seconds=5)
    clock = ManualClock(T0)
    for t in ("held", "free"):
        store.enqueue("skill", ["x"], clock.now(), task_id=t)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    store.claim("mac1", clock.now(), limit=2)
    later = clock.advance(S.orphan_claim_seconds + 1)
    agent = psycopg.connect(mesh_pg_url)  # an agent in the middle of a write to "held"
    agent.execute("SELECT 1 FROM mesh_task_queue WHERE task_id = 'held' FOR UPDATE")
    try:
        assert reconcile(store, later).orphaned_requeued == 1
        assert store.get_task("held").status is TaskStatus.CLAIMED
    finally:
        agent.rollback()
        agent.close()
    assert reconcile(store, later) == ReconcileCounts(orphaned_requeued=1)
    assert store.get_task("held").status is TaskStatus.QUEUED
    store.close()
