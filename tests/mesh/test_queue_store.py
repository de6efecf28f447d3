"""The mesh task queue on both backends: lifecycle, events, atomic claims, routing, pane state."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from fleet.clock import ManualClock
from fleet.errors import StoreUnavailable
from fleet.mesh.open import open_mesh_store
from fleet.mesh.pg_store import PgMeshStore
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity, MeshStore, TaskStatus
from tests.mesh.conftest import truncate_mesh

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """A factory of store connections to one fresh mesh database (one per thread)."""
    opened = []
    if request.param == "sqlite":
        path = tmp_path / "mesh.db"

        def factory():
            opened.append(SQLiteMeshStore(path))
            return opened[-1]
    else:
        url = request.getfixturevalue("mesh_pg_url")
        truncate_mesh(url)

        def factory():
            opened.append(PgMeshStore(url))
            return opened[-1]

    factory.kind = request.param
    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(backend) -> MeshStore:
    return backend()


def ident(machine_id: str, role: str = "worker") -> MachineIdentity:
    return MachineIdentity(machine_id=machine_id, mesh_id="mesh-test", role=role)


def register(store, *machine_ids: str, now) -> None:
    """A machine that never heartbeated cannot claim: register the claimers first."""
    for machine_id in machine_ids:
        store.heartbeat(ident(machine_id), now, None, [])


def test_both_backends_satisfy_the_protocol(store):
    assert isinstance(store, MeshStore)


def test_lifecycle_records_every_transition_as_an_event(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), "http://127.0.0.1:1/health", [])
    tid = store.enqueue("skill", ["claude", "-p", "evolve app-a"], clock.now(), task_id="t-1")
    assert tid == "t-1"
    # Idempotent on task_id: a retried enqueue neither duplicates the row nor the event.
    assert store.enqueue("skill", ["other"], clock.now(), task_id="t-1") == "t-1"

    [task] = store.claim("mac1", clock.advance(5))
    assert (task.task_id, task.status, task.claimed_by, task.command) == (
        "t-1",
        TaskStatus.CLAIMED,
        "mac1",
        ["claude", "-p", "evolve app-a"],
    )
    assert task.claimed_at == T0 + timedelta(seconds=5)
    assert store.claim("mac1", clock.now()) == []

    assert store.transition("t-1", "mac1", TaskStatus.INJECTED, clock.advance(1), pane_id="%3")
    assert store.progress("t-1", "mac1", clock.advance(1), note="compiling")
    assert store.progress("t-1", "mac1", clock.advance(1))
    assert store.transition("t-1", "mac1", TaskStatus.RUNNING, clock.advance(1))
    assert [t.task_id for t in store.tasks_of("mac1")] == ["t-1"]
    assert store.transition("t-1", "mac1", TaskStatus.DONE, clock.advance(1), output="ok")

    done = store.get_task("t-1")
    assert (done.status, done.pane_id, done.output, done.finished_at) == (
        TaskStatus.DONE,
        "%3",
        "ok",
        clock.now(),
    )
    assert store.tasks_of("mac1") == []
    events = store.events("t-1")
    assert [e.event for e in events] == [
        "queued",
        "claimed",
        "injected",
        "Progress",
        "running",
        "done",
    ]
    assert events[3].detail == {"note": "compiling"}
    assert all(e.machine_id == "mac1" for e in events[1:])
    # A finished task accepts no more transitions.
    assert not store.transition("t-1", "mac1", TaskStatus.FAILED, clock.now())


def test_transitions_are_conditional_on_the_claimer(store):
    clock = ManualClock(T0)
    register(store, "mac1", "mac3", now=clock.now())
    store.enqueue("review", ["codex"], clock.now(), task_id="t-2")
    store.claim("mac1", clock.now())
    assert not store.transition("t-2", "mac3", TaskStatus.RUNNING, clock.now())
    assert not store.progress("t-2", "mac3", clock.now())
    assert not store.handoff("t-2", "mac3", clock.now(), "notes")
    assert store.get_task("t-2").status is TaskStatus.CLAIMED
    with pytest.raises(ValueError, match="handoff"):
        store.transition("t-2", "mac1", TaskStatus.QUEUED, clock.now())


def test_handoff_requeues_with_the_checkpoint_without_counting_a_failure(store):
    clock = ManualClock(T0)
    register(store, "mac1", "mac3", now=clock.now())
    store.enqueue("hydra", ["hydra", "app-b"], clock.now(), task_id="t-3")
    store.claim("mac1", clock.now())
    store.transition("t-3", "mac1", TaskStatus.RUNNING, clock.advance(10), pane_id="%1")
    assert store.handoff("t-3", "mac1", clock.advance(10), "step 4 of 7 done; next: tests")
    task = store.get_task("t-3")
    assert (task.status, task.attempts, task.claimed_by, task.checkpoint) == (
        TaskStatus.QUEUED,
        0,
        None,
        "step 4 of 7 done; next: tests",
    )
    [again] = store.claim("mac3", clock.advance(1))
    assert again.checkpoint == "step 4 of 7 done; next: tests"
    assert [e.event for e in store.events("t-3")][-2:] == ["Handoff", "claimed"]


def test_claim_routes_targets_and_refuses_viewers_and_down_machines(store):
    clock = ManualClock(T0)
    store.enqueue("ship", ["xcodebuild"], clock.now(), target="mac1", task_id="for-mac1")
    store.enqueue("skill", ["claude"], clock.advance(1), task_id="anyone")
    store.heartbeat(ident("viewer1", role="viewer"), clock.now(), None, [])
    assert store.claim("viewer1", clock.now(), limit=5) == []
    assert store.claim("mac3", clock.now(), limit=5) == []  # never registered: nothing
    register(store, "mac3", now=clock.now())
    assert [t.task_id for t in store.claim("mac3", clock.now(), limit=5)] == ["anyone"]
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    store.mark_down("mac1", clock.now(), max_attempts=3)
    assert store.claim("mac1", clock.now(), limit=5) == []
    store.heartbeat(ident("mac1"), clock.advance(1), None, [])
    assert [t.task_id for t in store.claim("mac1", clock.now(), limit=5)] == ["for-mac1"]
    assert [e.event for e in store.events(event="MachineUp")] == ["MachineUp"]


def test_claims_come_oldest_first_up_to_the_limit(store):
    clock = ManualClock(T0)
    register(store, "mac1", "mac3", now=clock.now())
    for i in range(5):
        store.enqueue("skill", ["x", str(i)], clock.advance(1), task_id=f"t{i}")
    assert [t.task_id for t in store.claim("mac1", clock.now(), limit=3)] == ["t0", "t1", "t2"]
    assert [t.task_id for t in store.claim("mac3", clock.now(), limit=3)] == ["t3", "t4"]


def test_two_claimers_racing_claim_each_task_exactly_once(backend):
    seed = backend()
    now = T0
    n = 1000
    register(seed, "mac1", "mac3", now=now)
    for i in range(n):
        seed.enqueue("skill", ["x"], now + timedelta(microseconds=i), task_id=f"r{i:04d}")
    got: dict[str, list[str]] = {"mac1": [], "mac3": []}
    start = threading.Barrier(2)

    def claimer(machine: str) -> None:
        s = backend()  # its own connection
        start.wait()
        while True:
            batch = s.claim(machine, now, limit=7)
            if not batch:
                return
            got[machine].extend(t.task_id for t in batch)
            # Real claimers pause between claims; without it one SQLite writer can starve the
            # other (its busy handler sleeps) and the race would not be a race.
            time.sleep(0.001)

    threads = [threading.Thread(target=claimer, args=(m,)) for m in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    claimed = got["mac1"] + got["mac3"]
    assert len(claimed) == n and set(claimed) == {f"r{i:04d}" for i in range(n)}
    assert got["mac1"] and got["mac3"], "both claimers should have won some tasks"
    assert len(seed.events(event="claimed")) == n
    assert seed.queue_stats(now)["depth"]["claimed"] == n


def test_queue_stats_reports_depth_oldest_age_and_dead_letters(store):
    clock = ManualClock(T0)
    register(store, "mac1", now=clock.now())
    store.enqueue("skill", ["a"], clock.now(), task_id="a")
    store.enqueue("skill", ["b"], clock.advance(60), task_id="b")
    store.claim("mac1", clock.now())
    stats = store.queue_stats(clock.advance(40))
    assert stats["depth"]["queued"] == 1 and stats["depth"]["claimed"] == 1
    assert stats["oldest_queued_age_seconds"] == pytest.approx(40)
    assert stats["dead_letter"] == 0
    assert set(stats["depth"]) == {s.value for s in TaskStatus}


def test_leave_requeues_active_claims_without_counting_attempts(store):
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    store.enqueue("skill", ["a"], clock.now(), task_id="a")
    store.claim("mac1", clock.now())
    assert store.leave("mac1", clock.advance(5)) == 1
    task = store.get_task("a")
    assert (task.status, task.attempts, task.claimed_by) == (TaskStatus.QUEUED, 0, None)
    assert [m.status for m in store.machines()] == ["left"]
    assert store.claim("mac1", clock.now()) == []


def test_pane_state_upserts(store):
    clock = ManualClock(T0)
    store.set_pane_state("mac1", "%1", clock.now(), task_id="a", alive=True, context_ratio=0.2)
    store.set_pane_state(
        "mac1", "%1", clock.advance(1), task_id="a", alive=False, context_ratio=0.5
    )
    store.set_pane_state("mac3", "%2", clock.now(), task_id=None, alive=True)
    panes = store.pane_states()
    assert [(p["machine_id"], p["pane_id"], p["alive"], p["context_ratio"]) for p in panes] == [
        ("mac1", "%1", False, 0.5),
        ("mac3", "%2", True, None),
    ]
    assert panes[0]["updated_at"] == clock.now()
    assert [p["pane_id"] for p in store.pane_states("mac3")] == ["%2"]


def test_events_are_append_only(store, backend):
    store.enqueue("skill", ["a"], T0, task_id="a")
    if backend.kind == "sqlite":
        import sqlite3

        conn = sqlite3.connect(store.path)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE mesh_task_events SET event = 'forged'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM mesh_task_events")
        conn.close()
    else:
        import psycopg

        with psycopg.connect(store.conninfo.get_secret_value(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute("UPDATE mesh_task_events SET event = 'forged'")
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute("DELETE FROM mesh_task_events")
    assert [e.event for e in store.events("a")] == ["queued"]


def test_writes_of_an_old_claim_are_refused_after_the_same_machine_claims_again(store):
    store.heartbeat(MachineIdentity(machine_id="mac1", mesh_id="x"), T0, None, [])
    store.enqueue("skill", ["x"], T0, task_id="t")
    [first] = store.claim("mac1", T0)
    assert store.transition(
        "t", "mac1", TaskStatus.INJECTED, T0, pane_id="%1", claim_seq=first.claim_seq
    )
    later = T0 + timedelta(minutes=16)
    store.heartbeat(MachineIdentity(machine_id="mac1", mesh_id="x"), later, None, ["t"])
    counts = store.reconcile(
        later, orphan_seconds=600, stuck_seconds=900, expiry_seconds=86400, max_attempts=3
    )
    assert counts.stuck_requeued == 1
    [second] = store.claim("mac1", later)  # a new attempt, same machine
    assert second.claim_seq == first.claim_seq + 1
    assert [e.detail for e in store.events("t", event="claimed")] == [
        {"attempts": 0, "claim_seq": first.claim_seq},
        {"attempts": 1, "claim_seq": second.claim_seq},
    ]
    stale = later + timedelta(seconds=5)
    assert not store.transition(
        "t",
        "mac1",
        TaskStatus.DONE,
        stale,
        output="from the old attempt",
        claim_seq=first.claim_seq,
    )
    assert not store.progress("t", "mac1", stale, note="old pane", claim_seq=first.claim_seq)
    assert not store.handoff("t", "mac1", stale, "old checkpoint", claim_seq=first.claim_seq)
    task = store.get_task("t")
    assert (task.status, task.output, task.progress_at, task.checkpoint) == (
        TaskStatus.CLAIMED,
        None,
        None,
        None,
    )
    assert store.transition("t", "mac1", TaskStatus.INJECTED, stale, claim_seq=second.claim_seq)
    assert store.progress("t", "mac1", stale, claim_seq=second.claim_seq)
    assert store.transition(
        "t", "mac1", TaskStatus.DONE, stale, output="new", claim_seq=second.claim_seq
    )
    assert store.get_task("t").output == "new"


def test_naive_datetimes_are_taken_as_utc_on_both_backends(store):
    naive = T0.replace(tzinfo=None)
    later = naive + timedelta(minutes=5)
    store.heartbeat(MachineIdentity(machine_id="mac1", mesh_id="x"), naive, None, [])
    store.enqueue("skill", ["x"], naive, task_id="waiting")
    assert store.get_task("waiting").created_at == T0
    assert store.queue_stats(later)["oldest_queued_age_seconds"] == 300
    health = store.record_confirmation(
        "mac1", True, later, stale_before=later - timedelta(minutes=1)
    )
    assert (health.status, health.failed_confirmations) == ("suspect", 1)
    assert store.mark_down("mac1", later, stale_before=naive, max_attempts=3) == -1  # beat at naive
    assert store.mark_down("mac1", later, stale_before=later, max_attempts=3) == 0
    assert store.machines()[0].status == "down"


def test_a_sqlite_file_of_the_first_schema_gains_the_claim_columns_on_open(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    SQLiteMeshStore(path).close()
    with sqlite3.connect(path) as conn:  # back to the first release's tables and indexes
        conn.execute("ALTER TABLE mesh_task_queue DROP COLUMN claim_seq")
        conn.execute("ALTER TABLE mesh_pane_state DROP COLUMN claim_seq")
        conn.execute(
            "CREATE INDEX mesh_task_queue_claimed ON mesh_task_queue (claimed_at) "
            "WHERE status = 'claimed'"
        )
    store = SQLiteMeshStore(path)
    register(store, "mac1", now=T0)
    store.enqueue("skill", ["x"], T0, task_id="t")
    [task] = store.claim("mac1", T0)
    assert task.claim_seq == 1
    store.set_pane_state("mac1", "%1", T0, task_id="t", alive=True)
    assert store.pane_states()[0]["claim_seq"] == 1
    indexes = {r[0] for r in store._query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "mesh_task_queue_in_flight" in indexes and "mesh_task_queue_claimed" not in indexes
    store.close()


def test_migrations_are_rerunnable_and_define_the_claim_function(mesh_pg_url):
    import psycopg

    from fleet.store.migrations import apply_migrations

    # Re-running the whole directory over itself is clean (force: the ledger would skip it).
    assert "0002_mesh.sql" in apply_migrations(mesh_pg_url, force=True)
    assert "0002_mesh.sql" in apply_migrations(mesh_pg_url, force=True)
    with psycopg.connect(mesh_pg_url) as conn:
        volatility = conn.execute(
            "SELECT provolatile FROM pg_proc WHERE proname = 'mesh_claim'"
        ).fetchone()[0]
        indexes = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'mesh_task_queue'"
            )
        }
    assert volatility == "v"
    # The reconciler's rules read partial indexes of stale candidates, not the whole table.
    in_flight = "ARRAY['claimed'::text, 'injected'::text, 'running'::text]"
    assert in_flight in indexes["mesh_task_queue_in_flight"]
    assert "ARRAY['injected'::text, 'running'::text]" in indexes["mesh_task_queue_in_pane"]
    assert "mesh_task_queue_claimed" not in indexes and "mesh_task_queue_injected" not in indexes
    assert "WHERE (status = 'queued'::text)" in indexes["mesh_task_queue_queued"]


def test_a_database_of_the_first_schema_gains_the_claim_columns(mesh_pg_url):
    import psycopg

    from fleet.store.migrations import apply_migrations

    truncate_mesh(mesh_pg_url)
    with psycopg.connect(mesh_pg_url, autocommit=True) as conn:  # back to the first release
        conn.execute("ALTER TABLE mesh_task_queue DROP COLUMN claim_seq")
        conn.execute("ALTER TABLE mesh_pane_state DROP COLUMN claim_seq")
    assert "0002_mesh.sql" in apply_migrations(mesh_pg_url, force=True)
    store = PgMeshStore(mesh_pg_url)
    register(store, "mac1", now=T0)
    store.enqueue("skill", ["x"], T0, task_id="t")
    assert [t.claim_seq for t in store.claim("mac1", T0)] == [1]
    store.set_pane_state("mac1", "%1", T0, task_id="t", alive=True)
    assert store.pane_states()[0]["claim_seq"] == 1
    store.close()


def test_open_mesh_store_picks_the_backend_from_the_url(tmp_path, mesh_pg_url):
    from fleet.errors import ConfigError

    s = open_mesh_store(f"sqlite:///{tmp_path / 'm.db'}")
    assert isinstance(s, SQLiteMeshStore)
    s.close()
    p = open_mesh_store(mesh_pg_url)
    assert isinstance(p, PgMeshStore)
    assert isinstance(p.machines(), list)
    p.close()
    with pytest.raises(ConfigError, match="sqlite:///"):
        open_mesh_store("supabase://x")


def test_an_unreachable_postgres_is_store_unavailable():
    s = PgMeshStore("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_seconds=1)
    with pytest.raises(StoreUnavailable, match="127.0.0.1:1/nowhere"):
        s.machines()


def test_mesh_tables_and_functions_are_closed_to_other_roles(mesh_pg_url):
    import uuid

    import psycopg

    role = f"fleet_probe_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(mesh_pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
        try:
            executable = conn.execute(
                "SELECT proname FROM pg_proc WHERE proname LIKE 'mesh\\_%%' "
                "AND has_function_privilege(%s, oid, 'EXECUTE')",
                (role,),
            ).fetchall()
            readable = conn.execute(
                "SELECT relname FROM pg_class WHERE relname LIKE 'mesh\\_%%' AND relkind = 'r' "
                "AND has_table_privilege(%s, oid, 'SELECT')",
                (role,),
            ).fetchall()
            functions = conn.execute(
                "SELECT count(*) FROM pg_proc WHERE proname IN "
                "('mesh_claim', 'mesh_reconcile', 'mesh_requeue_failed')"
            ).fetchone()[0]
        finally:
            conn.execute(f'DROP ROLE "{role}"')
    assert functions == 3
    assert executable == [] and readable == []
