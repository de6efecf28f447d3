"""supabase/migrations on the real PostgreSQL: clean and repeated application, and the SQL
functions themselves — one claim winner under real concurrency, fencing, leases, privileges."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import threading
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from fleet.models import ALLOWED_TRANSITIONS, Stage
from fleet.store.migrations import apply_migrations, migration_files
from tests.conftest import PG_ADMIN_URL

T0 = datetime(2026, 3, 25, 12, 0, tzinfo=UTC)
PIPELINE_TABLES = {
    "app_evolution_states",
    "app_evolution_tasks",
    "trajectories",
    "fleet_config",
    "cohorts",
    "fleet_leases",
}
PIPELINE_FUNCTIONS = {
    "fleet_stage_allowed",
    "fleet_claim_app",
    "fleet_set_stage",
    "fleet_reset_app",
    "fleet_reward_means",
    "fleet_acquire_lease",
    "fleet_release_lease",
}


@pytest.fixture(scope="module")
def empty_db(pg_url):
    """A database of its own, empty until the test applies the migrations."""
    name = f"fleet_migr_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db(empty_db):
    apply_migrations(empty_db)
    return empty_db


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def new_app(url: str) -> str:
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    with connect(url) as conn:
        conn.execute("INSERT INTO app_evolution_states (app_id) VALUES (%s)", (app_id,))
    return app_id


def test_migrations_apply_to_an_empty_database_and_again(empty_db):
    files = [p.name for p in migration_files()]
    assert "0001_pipeline.sql" in files
    assert apply_migrations(empty_db) == files
    assert apply_migrations(empty_db) == []  # recorded: a store that starts again applies nothing
    assert apply_migrations(empty_db, force=True) == files  # re-runnable: a second pass is a no-op
    with connect(empty_db) as conn:
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        functions = {
            r[0]
            for r in conn.execute(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            )
        }
        no_rls = {
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relname = ANY(%s) AND NOT relrowsecurity",
                (list(PIPELINE_TABLES),),
            )
        }
        volatility = dict(
            conn.execute(
                "SELECT proname, provolatile FROM pg_proc WHERE proname = ANY(%s)",
                (["fleet_claim_app", "fleet_set_stage", "fleet_acquire_lease"],),
            ).fetchall()
        )
    assert tables >= PIPELINE_TABLES
    assert functions >= PIPELINE_FUNCTIONS
    assert no_rls == set()
    assert set(volatility.values()) == {"v"}


def test_sql_transition_table_mirrors_the_python_one(db):
    stages = [s.value for s in Stage]
    with connect(db) as conn:
        rows = conn.execute(
            "SELECT f, t, fleet_stage_allowed(f, t)"
            " FROM unnest(%s::text[]) f, unnest(%s::text[]) t",
            (stages, stages),
        ).fetchall()
    assert len(rows) == 64
    for f, t, allowed in rows:
        assert allowed == (Stage(t) in ALLOWED_TRANSITIONS[Stage(f)]), (f, t)


def test_schema_rejects_bad_app_ids_and_stages(db):
    with connect(db) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO app_evolution_states (app_id) VALUES ('a;rm -rf')")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO app_evolution_states (app_id) VALUES (%s)", ("a" * 65,))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO app_evolution_states (app_id, stage) VALUES ('ok-app', 'bogus')"
            )


def test_claim_under_real_concurrency_has_exactly_one_winner(db):
    app_id = new_app(db)
    n = 8
    conns = [connect(db) for _ in range(n)]
    barrier = threading.Barrier(n, timeout=10)
    results: list[int | None] = [None] * n
    errors: list[BaseException] = []

    def claim(i: int) -> None:
        conn = conns[i]
        try:
            # Each claimer keeps its transaction open until all have tried: the winner holds
            # the row lock meanwhile, so the others must skip it (SKIP LOCKED), not wait.
            with conn.transaction():
                barrier.wait()
                results[i] = conn.execute(
                    "SELECT fleet_claim_app(%s, %s, %s, %s, 600)",
                    (app_id, f"host:{i}", f"run-{i}", T0),
                ).fetchone()[0]
                barrier.wait()
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    for conn in conns:
        conn.close()
    assert errors == []
    winners = [r for r in results if r is not None]
    assert winners == [1]
    with connect(db) as conn:
        owner, epoch = conn.execute(
            "SELECT owner, epoch FROM app_evolution_states WHERE app_id = %s", (app_id,)
        ).fetchone()
        assert epoch == 1 and owner == f"host:{results.index(1)}"
        # Once committed, the claim is still held for a fresh claimer...
        assert (
            conn.execute(
                "SELECT fleet_claim_app(%s, 'other', 'r', %s, 600)", (app_id, T0)
            ).fetchone()[0]
            is None
        )
        # ...unless the caller vouches that the owner is dead.
        assert (
            conn.execute(
                "SELECT fleet_claim_app(%s, 'other', 'r', %s, 600, %s)", (app_id, T0, owner)
            ).fetchone()[0]
            == 2
        )


def test_stale_epoch_write_is_refused_by_the_sql_function(db):
    app_id = new_app(db)
    with connect(db) as conn:
        old = conn.execute(
            "SELECT fleet_claim_app(%s, 'h1', 'r1', %s, 60)", (app_id, T0)
        ).fetchone()[0]
        later = T0 + timedelta(minutes=2)
        new = conn.execute(
            "SELECT fleet_claim_app(%s, 'h2', 'r2', %s, 60)", (app_id, later)
        ).fetchone()[0]
        assert new == old + 1
        with pytest.raises(psycopg.errors.RaiseException) as err:
            conn.execute(
                "SELECT * FROM fleet_set_stage(%s, 'skillRunning', %s, %s)", (app_id, old, later)
            )
        assert err.value.sqlstate == "P0001"
        assert err.value.diag.message_primary.startswith("stale_lease: ")
        with pytest.raises(psycopg.errors.RaiseException) as err:
            conn.execute(
                "SELECT * FROM fleet_set_stage(%s, 'complete', %s, %s)", (app_id, new, later)
            )
        assert err.value.diag.message_primary.startswith(
            "invalid_transition: stage queued cannot move"
        )
        stage, started = conn.execute(
            "SELECT stage, stage_started_at FROM app_evolution_states WHERE app_id = %s", (app_id,)
        ).fetchone()
        assert (stage, started) == ("queued", None)
        row = conn.execute(
            "SELECT stage, epoch, lease_until"
            " FROM fleet_set_stage(%s, 'skillRunning', %s, %s, NULL, 600)",
            (app_id, new, later),
        ).fetchone()
        assert row == ("skillRunning", new, later + timedelta(seconds=600))
        conn.execute("SELECT fleet_reset_app(%s, %s)", (app_id, later))
        with pytest.raises(psycopg.errors.RaiseException, match="stale_lease"):
            conn.execute(
                "SELECT * FROM fleet_set_stage(%s, 'failed', %s, %s)", (app_id, new, later)
            )


def test_lease_acquire_renew_and_takeover_after_expiry_bump_the_epoch(db):
    name = f"leader-{uuid.uuid4().hex[:6]}"

    def acquire(holder: str, at: float) -> int | None:
        with connect(db) as conn:
            return conn.execute(
                "SELECT fleet_acquire_lease(%s, %s, %s, 15)",
                (name, holder, T0 + timedelta(seconds=at)),
            ).fetchone()[0]

    assert acquire("cloud-vm", 0) == 1
    assert acquire("cloud-vm", 10) == 1  # renewal keeps the epoch...
    assert acquire("mac1", 20) is None  # ...and the expiry: 10 + 15 > 20
    assert acquire("mac1", 26) == 2  # expired: takeover bumps the fencing token
    assert acquire("cloud-vm", 30) is None  # the deposed leader cannot come back while mac1 renews
    assert acquire("mac1", 35) == 2
    assert acquire("cloud-vm", 51) == 3
    with connect(db) as conn:
        holder, expires = conn.execute(
            "SELECT holder, expires_at FROM fleet_leases WHERE name = %s", (name,)
        ).fetchone()
    assert (holder, expires) == ("cloud-vm", T0 + timedelta(seconds=66))


def test_concurrent_lease_acquirers_have_one_winner(db):
    name = f"leader-{uuid.uuid4().hex[:6]}"
    n = 6
    barrier = threading.Barrier(n, timeout=10)
    results: list[int | None] = [None] * n

    def acquire(i: int) -> None:
        with connect(db) as conn:
            barrier.wait()
            results[i] = conn.execute(
                "SELECT fleet_acquire_lease(%s, %s, %s, 15)", (name, f"node-{i}", T0)
            ).fetchone()[0]

    threads = [threading.Thread(target=acquire, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert [r for r in results if r is not None] == [1]


def test_functions_and_tables_are_closed_to_other_roles(db):
    role = f"fleet_probe_{uuid.uuid4().hex[:8]}"
    with connect(db) as conn:
        conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
        try:
            executable = conn.execute(
                "SELECT p.proname FROM pg_proc p WHERE p.proname = ANY(%s) "
                "AND has_function_privilege(%s, p.oid, 'EXECUTE')",
                (list(PIPELINE_FUNCTIONS), role),
            ).fetchall()
            readable = conn.execute(
                "SELECT c.relname FROM pg_class c WHERE c.relname = ANY(%s) "
                "AND has_table_privilege(%s, c.oid, 'SELECT')",
                (list(PIPELINE_TABLES), role),
            ).fetchall()
        finally:
            conn.execute(f'DROP ROLE "{role}"')
    assert executable == [] and readable == []


def test_a_store_starting_on_a_migrated_database_does_not_wait_for_readers(db):
    """Re-running the DDL takes ACCESS EXCLUSIVE locks; an open read would block every start."""
    with connect(db) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM app_evolution_states")
        assert apply_migrations(f"{db}?options=-c%20lock_timeout%3D2000") == []
        reader.execute("ROLLBACK")


def test_a_changed_migration_is_applied_again_with_every_later_one(db, tmp_path):
    for path in migration_files():
        (tmp_path / path.name).write_text(path.read_text())
    assert apply_migrations(db, tmp_path) == []
    names = sorted(p.name for p in migration_files())
    changed = tmp_path / names[1]
    changed.write_text(changed.read_text() + "\n-- a comment changes the checksum\n")
    # later files may re-grant what an earlier one revokes, so they follow it
    assert apply_migrations(db, tmp_path) == names[1:]
    assert apply_migrations(db, tmp_path) == []


# Where the migrations are found -------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def test_migrations_are_found_from_any_working_directory(tmp_path, monkeypatch):
    expected = sorted(p.name for p in (REPO / "supabase" / "migrations").glob("*.sql"))
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in migration_files()] == expected
    assert all(p.read_text(encoding="utf-8").strip() for p in migration_files())


def test_the_wheel_ships_the_migrations_and_the_named_queries(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH: cannot build the wheel")
    built = subprocess.run(
        [uv, "build", "--wheel", "--offline", "-o", str(tmp_path / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if built.returncode != 0 and "offline" in built.stderr.lower():
        pytest.skip(f"cannot build offline here: {built.stderr.strip()[-200:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    shipped = {
        f"fleet/migrations/{p.name}" for p in (REPO / "supabase" / "migrations").glob("*.sql")
    }
    assert shipped and shipped <= names
    assert {
        "fleet/store/queries.sql",
        "fleet/mesh/queries.sql",
        "fleet/mesh/queries_sqlite.sql",
    } <= names
    # Installed (here: unpacked) away from any checkout and run from elsewhere, the package
    # finds its own copy.
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fleet.store.migrations import migration_files as m; print([str(p) for p in m()])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    paths = ast.literal_eval(found.stdout)
    assert paths and all(p.startswith(str(site / "fleet" / "migrations")) for p in paths)
