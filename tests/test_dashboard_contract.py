"""The Swift dashboard's contract (supabase/migrations/0004_dashboard.sql) on the real PostgreSQL,
exercised under the dashboard's own role (SET ROLE authenticated): it reads everything, writes
only through its three functions, and can never write `stage`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg
import pytest

from fleet.models import Task
from fleet.store.migrations import apply_migrations, migration_files
from fleet.store.postgres import PostgresStore

T0 = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
DASHBOARD_READS = [
    "app_evolution_states",
    "app_evolution_tasks",
    "trajectories",
    "fleet_config",
    "cohorts",
    "mesh_health",
    "mesh_task_queue",
    "mesh_task_events",
]
ORCHESTRATOR_FUNCTIONS = [
    "SELECT fleet_claim_app(%s, 'dash', 'r', now(), 600)",
    "SELECT * FROM fleet_set_stage(%s, 'failed', 1, now())",
    "SELECT fleet_reset_app(%s, now())",
]


@pytest.fixture(scope="module")
def db(pg_url) -> str:
    apply_migrations(pg_url)
    return pg_url


@contextmanager
def as_role(url: str, role: str) -> Iterator[psycopg.Connection]:
    """A connection that acts as `role`, as PostgREST does for a request with that role's JWT."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET ROLE "{role}"')
        yield conn


def new_app(url: str, stage: str = "queued") -> str:
    app_id = f"dash-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO app_evolution_states (app_id, stage) VALUES (%s, %s)", (app_id, stage)
        )
    return app_id


def row(url: str, sql: str, params: tuple) -> dict:
    with psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        found = conn.execute(sql, params).fetchone()
    assert found is not None
    return found


def test_the_dashboard_reads_every_table_it_shows(db):
    app_id = new_app(db, "failed")
    with as_role(db, "authenticated") as conn:
        for table in DASHBOARD_READS:
            conn.execute(f"SELECT * FROM {table} LIMIT 1").fetchall()  # no permission error
        stages = conn.execute(
            "SELECT stage FROM app_evolution_states WHERE app_id = %s", (app_id,)
        ).fetchall()
    assert stages == [("failed",)]  # the policy lets the rows through, not just the grant


def test_anon_reads_nothing_and_calls_nothing(db):
    app_id = new_app(db)
    with as_role(db, "anon") as conn:
        for table in DASHBOARD_READS:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM {table} LIMIT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT fleet_dashboard_enqueue(%s)", (app_id,))


def test_a_direct_stage_write_by_the_dashboard_is_refused(db):
    app_id = new_app(db, "skillRunning")
    with as_role(db, "authenticated") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(
                "UPDATE app_evolution_states SET stage = 'complete' WHERE app_id = %s", (app_id,)
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO app_evolution_states (app_id, stage) VALUES ('x-dash', 'complete')"
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM app_evolution_states WHERE app_id = %s", (app_id,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE app_evolution_tasks SET done_at = now()")
        # The orchestrator's own functions are not the dashboard's either.
        for sql in ORCHESTRATOR_FUNCTIONS:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql, (app_id,))
    assert row(db, "SELECT stage FROM app_evolution_states WHERE app_id = %s", (app_id,)) == {
        "stage": "skillRunning"
    }


def test_enqueue_adds_a_new_app_as_queued(db):
    app_id = f"dash-{uuid.uuid4().hex[:8]}"
    with as_role(db, "authenticated") as conn:
        stage, requested_at, requested_by = conn.execute(
            "SELECT stage, requested_at, requested_by FROM fleet_dashboard_enqueue(%s)", (app_id,)
        ).fetchone()
    assert stage == "queued" and requested_at is not None
    assert requested_by == "postgres"  # the session's user; under PostgREST the JWT's email or sub


def test_enqueue_of_a_failed_app_asks_for_a_run_and_leaves_its_stage_to_the_orchestrator(db):
    app_id = new_app(db, "failed")
    with as_role(db, "authenticated") as conn:
        conn.execute("SELECT fleet_dashboard_hold(%s, 'flaky build')", (app_id,))
        conn.execute("SELECT fleet_dashboard_enqueue(%s)", (app_id,))
    state = row(db, "SELECT * FROM app_evolution_states WHERE app_id = %s", (app_id,))
    assert state["stage"] == "failed"
    assert state["requested_at"] is not None
    assert (state["held_at"], state["held_by"], state["hold_reason"]) == (None, None, None)


def test_hold_records_who_and_why_and_refuses_an_unknown_app(db):
    app_id = new_app(db)
    with as_role(db, "authenticated") as conn:
        conn.execute("SELECT fleet_dashboard_enqueue(%s)", (app_id,))
        reason = "  waiting for design " + "x" * 600
        conn.execute("SELECT fleet_dashboard_hold(%s, %s)", (app_id, reason))
        with pytest.raises(psycopg.errors.RaiseException, match="^unknown_app: nope-app "):
            conn.execute("SELECT fleet_dashboard_hold('nope-app')")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("SELECT fleet_dashboard_enqueue('a;rm -rf')")
    state = row(db, "SELECT * FROM app_evolution_states WHERE app_id = %s", (app_id,))
    assert state["held_at"] is not None and state["held_by"] == "postgres"
    assert state["hold_reason"].startswith("waiting for design x")
    assert len(state["hold_reason"]) == 500
    assert state["requested_at"] is None  # a hold withdraws the request for a run
    assert state["stage"] == "queued"


def test_the_caller_is_the_jwt_subject_under_postgrest(db):
    app_id = new_app(db)
    with as_role(db, "authenticated") as conn:
        # PostgREST puts the verified JWT's claims here for the request's transaction.
        conn.execute(
            "SELECT set_config('request.jwt.claims', %s, false)",
            ('{"sub": "0b6f", "email": "ops@example.com", "role": "authenticated"}',),
        )
        held_by = conn.execute(
            "SELECT held_by FROM fleet_dashboard_hold(%s)", (app_id,)
        ).fetchone()[0]
    assert held_by == "ops@example.com"


def test_mark_task_done_and_undo_and_a_reparse_keeps_it_done(db):
    app_id = new_app(db)
    task = Task(app_id=app_id, description="Fix the crash on launch", priority=1)
    store = PostgresStore(db)
    try:
        store.upsert_tasks([task], T0)
        with as_role(db, "authenticated") as conn:
            done_at, done_by = conn.execute(
                "SELECT done_at, done_by FROM fleet_dashboard_mark_task_done(%s)", (task.key,)
            ).fetchone()
            assert done_at is not None and done_by == "postgres"
            again = conn.execute(
                "SELECT done_at FROM fleet_dashboard_mark_task_done(%s)", (task.key,)
            ).fetchone()[0]
            assert again == done_at  # marking twice keeps the first time
            with pytest.raises(psycopg.errors.RaiseException, match="^unknown_task: "):
                conn.execute("SELECT fleet_dashboard_mark_task_done('no-such-key')")
        # The next PARSE upserts the same task: the dashboard's tick survives it.
        store.upsert_tasks([task.model_copy(update={"priority": 2})], T0)
        kept = row(
            db, "SELECT priority, done_at FROM app_evolution_tasks WHERE task_key = %s", (task.key,)
        )
        assert kept == {"priority": 2, "done_at": done_at}
        with as_role(db, "authenticated") as conn:
            undone = conn.execute(
                "SELECT done_at, done_by FROM fleet_dashboard_mark_task_done(%s, false)",
                (task.key,),
            ).fetchone()
        assert undone == (None, None)
        assert [t.description for t in store.list_tasks(app_id)] == ["Fix the crash on launch"]
    finally:
        store.close()


def test_the_contract_survives_a_second_application(db):
    def policies() -> list[tuple]:
        with psycopg.connect(db, autocommit=True) as conn:
            return conn.execute(
                "SELECT tablename, policyname, roles::text, cmd FROM pg_policies "
                "WHERE policyname = 'fleet_dashboard_read' ORDER BY tablename"
            ).fetchall()

    before = policies()
    assert [p[0] for p in before] == sorted(DASHBOARD_READS)
    assert {(p[2], p[3]) for p in before} == {("{authenticated}", "SELECT")}
    apply_migrations(db, force=True)
    assert policies() == before
    with as_role(db, "authenticated") as conn:
        conn.execute("SELECT count(*) FROM app_evolution_states").fetchone()
        writable = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relname = ANY(%s) AND ("
            "has_table_privilege('authenticated', c.oid, 'INSERT') OR "
            "has_table_privilege('authenticated', c.oid, 'UPDATE') OR "
            "has_table_privilege('authenticated', c.oid, 'DELETE'))",
            (DASHBOARD_READS,),
        ).fetchall()
    assert writable == []


def test_the_contract_survives_an_edit_of_an_earlier_migration(db, tmp_path):
    for path in migration_files():
        (tmp_path / path.name).write_text(path.read_text())
    apply_migrations(db, tmp_path)
    edited = tmp_path / "0001_pipeline.sql"
    edited.write_text(edited.read_text() + "\n-- an edit changes the checksum\n")
    try:
        apply_migrations(db, tmp_path)
        with psycopg.connect(db, autocommit=True) as conn:
            readable = conn.execute(
                "SELECT has_table_privilege('authenticated', 'app_evolution_states', 'SELECT')"
            ).fetchone()
        assert readable == (True,)
    finally:
        apply_migrations(db, force=True)  # the real files, so later tests see the contract
