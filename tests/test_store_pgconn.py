"""The one PostgreSQL connector and its parts: named queries, the refusal table, UTC times.

Connector tests run on the real PostgreSQL (the session's throwaway database)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest

from fleet.errors import InvalidTransition, StaleLease, StoreUnavailable
from fleet.mesh.pg_store import PgMeshStore
from fleet.store import queries
from fleet.store.pgconn import PgConnector, Timeouts
from fleet.store.postgres import PostgresStore
from fleet.store.refusals import REFUSALS, refusal
from fleet.store.timestamps import iso, utc

T0 = datetime(2026, 3, 25, 12, 0, tzinfo=UTC)


# Timestamps -------------------------------------------------------------------------
def test_a_naive_time_is_utc_and_an_aware_one_keeps_its_instant():
    assert utc(datetime(2026, 3, 25, 12, 0)) == T0
    assert utc(datetime(2026, 3, 25, 12, 0)).tzinfo is UTC
    ist = timezone(timedelta(hours=5, minutes=30))
    assert utc(datetime(2026, 3, 25, 17, 30, tzinfo=ist)) == T0
    assert utc(datetime(2026, 3, 25, 17, 30, tzinfo=ist)).tzinfo is UTC


def test_iso_is_fixed_width_so_strings_sort_in_time_order():
    assert iso(T0) == "2026-03-25T12:00:00.000000+00:00"
    later = T0 + timedelta(microseconds=1)
    assert len(iso(T0)) == len(iso(later)) and iso(T0) < iso(later)


# The refusal table ------------------------------------------------------------------
def test_every_refusal_prefix_maps_to_its_exception_with_the_reason():
    assert set(REFUSALS.values()) == {StaleLease, InvalidTransition}
    stale = refusal("stale_lease: epoch 3 no longer owns app-a")
    assert isinstance(stale, StaleLease) and str(stale) == "epoch 3 no longer owns app-a"
    assert isinstance(refusal("invalid_transition: queued -> shipped"), InvalidTransition)
    assert refusal("division by zero") is None


# Named queries ----------------------------------------------------------------------
def test_named_queries_are_split_on_their_name_lines():
    text = "-- header\n\n-- name: first\nSELECT 1\n\n-- name: second\n-- why\nSELECT 2;\n"
    assert queries.parse(text) == {"first": "SELECT 1", "second": "-- why\nSELECT 2;"}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("-- name: twice\nSELECT 1\n-- name: twice\nSELECT 2\n", "defined twice"),
        ("-- name: empty\n\n-- name: other\nSELECT 1\n", "has no SQL"),
    ],
)
def test_a_malformed_query_file_is_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        queries.parse(text)


def test_query_files_are_read_once_and_cannot_be_changed():
    first = queries.load("fleet.mesh", "queries.sql")
    assert queries.load("fleet.mesh", "queries.sql") is first
    assert {"claim", "reconcile", "transition", "handoff"} <= set(first)
    with pytest.raises(TypeError):
        first["claim"] = "DROP TABLE mesh_task_queue"  # type: ignore[index]


@pytest.mark.parametrize(
    "package, filename",
    [
        ("fleet.store", "queries.sql"),
        ("fleet.store", "queries_sqlite.sql"),
        ("fleet.mesh", "queries.sql"),
        ("fleet.mesh", "queries_sqlite.sql"),
    ],
)
def test_every_query_file_parses_and_has_no_python_format_pieces(package, filename):
    named = queries.load(package, filename)
    assert named
    for name, sql in named.items():
        assert "{" not in sql, f"{filename}:{name} looks like an f-string template"


# The connector on the real PostgreSQL -----------------------------------------------
@pytest.fixture
def db(pg_url):
    connector = PgConnector(
        pg_url,
        timeouts=Timeouts(connect=5, statement=1, lock=0.5),
        application_name="fleet-conn-test",
    )
    yield connector
    connector.close()


def test_the_session_is_utc_with_the_timeouts_set(db):
    row = db.fetch_one(
        "SELECT current_setting('TimeZone') AS tz, current_setting('statement_timeout') AS st, "
        "current_setting('lock_timeout') AS lt, now() AS now"
    )
    assert row == {**row, "tz": "UTC", "st": "1s", "lt": "500ms"}
    assert row["now"].utcoffset() == timedelta(0)


def test_a_slow_statement_is_cut_by_the_statement_timeout(db):
    with pytest.raises(StoreUnavailable, match="statement timeout"):
        db.fetch("SELECT pg_sleep(5)")
    assert db.fetch_one("SELECT 1 AS one") == {"one": 1}  # the connection is still usable


def test_a_held_lock_is_an_error_after_the_lock_timeout_not_a_hang(db, pg_url):
    db.execute("CREATE TABLE IF NOT EXISTS conn_lock_probe (id int)")
    with psycopg.connect(pg_url) as holder:
        holder.execute("LOCK TABLE conn_lock_probe IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            db.fetch("SELECT * FROM conn_lock_probe")
        holder.rollback()


def _kill(pg_url: str, application_name: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (application_name,),
        )


def test_a_dropped_connection_is_reopened_and_only_safe_work_repeated(db, pg_url):
    assert db.fetch_one("SELECT 1 AS one") == {"one": 1}
    _kill(pg_url, "fleet-conn-test")
    assert db.fetch_one("SELECT 2 AS two") == {"two": 2}  # reopened, repeated once
    calls = []

    def write(conn: psycopg.Connection) -> None:
        calls.append(1)
        conn.execute("SELECT 1")

    _kill(pg_url, "fleet-conn-test")
    with pytest.raises(StoreUnavailable, match="connection lost"):
        db.run(write, retry_safe=False)
    assert len(calls) == 1
    assert db.fetch_one("SELECT 3 AS three") == {"three": 3}


def test_a_refusal_raised_in_sql_comes_back_as_the_domain_error(db):
    with pytest.raises(StaleLease, match="epoch 1 no longer owns app-a"):
        db.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'stale_lease: epoch 1 no longer owns app-a'; END $$"
        )
    with pytest.raises(StoreUnavailable, match="boom"):
        db.execute("DO $$ BEGIN RAISE EXCEPTION 'boom'; END $$")


def test_errors_never_carry_the_password(pg_url):
    secret = "s3cret-Pa55"
    url = f"postgresql://fleet_nobody:{secret}@127.0.0.1:5432/none"
    connector = PgConnector(url, timeouts=Timeouts(connect=2))
    assert secret not in repr(connector) and "fleet_nobody@127.0.0.1:5432/none" in connector.where
    with pytest.raises(StoreUnavailable) as caught:
        connector.fetch("SELECT 1")
    assert secret not in str(caught.value) and caught.value.__cause__ is None
    assert caught.value.__context__ is None or secret not in str(caught.value.__context__)


def test_both_stores_share_the_one_connector(pg_url):
    from fleet.store.migrations import apply_migrations

    apply_migrations(pg_url)
    pipeline, mesh = PostgresStore(pg_url, apply_schema=False), PgMeshStore(pg_url)
    try:
        assert isinstance(pipeline._db, PgConnector) and isinstance(mesh._db, PgConnector)
        # The mesh store reads on the same policy: a dropped connection is reopened.
        before = mesh.machines()
        _kill(pg_url, "fleet-mesh")
        assert mesh.machines() == before
    finally:
        pipeline.close()
        mesh.close()


def test_one_connector_is_safe_to_share_between_threads(db):
    results: list[int] = []

    def read(i: int) -> None:
        results.append(db.fetch_one("SELECT %s::int AS i", (i,))["i"])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))


def test_threads_query_at_once_on_up_to_n_connections(pg_url):
    """Apps leaving a stage together make their store calls from several threads: with
    `connections=2` two of them are inside a query at the same moment (one connection under
    a lock made every call queue behind the one in flight)."""
    connector = PgConnector(pg_url, connections=2, application_name="fleet-conn-pool")
    both_inside = threading.Barrier(2, timeout=10)
    seen: list[int] = []

    def meet(conn: psycopg.Connection) -> None:
        seen.append(conn.info.backend_pid)
        both_inside.wait()  # broken (an error) unless the other thread is inside too

    try:
        threads = [threading.Thread(target=connector.run, args=(meet,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(seen)) == 2 and not both_inside.broken
        # A third thread waits for a free connection: no third one is opened.
        connector.fetch_one("SELECT 1 AS one")
        assert _backends(pg_url, "fleet-conn-pool") == 2
    finally:
        connector.close()
    assert _backends(pg_url, "fleet-conn-pool") == 0


def test_a_nested_call_on_the_same_thread_uses_the_connection_it_holds(pg_url):
    connector = PgConnector(pg_url, connections=1, application_name="fleet-conn-nested")
    try:
        with connector.transaction() as conn:
            conn.execute("CREATE TEMP TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
            # Inside the transaction, on its connection: it sees the uncommitted row.
            assert connector.fetch_one("SELECT count(*) AS n FROM t") == {"n": 1}
    finally:
        connector.close()


def _backends(pg_url: str, application_name: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])
