"""Mesh store fixtures shared by the agent and watchdog tests: a real SQLite file and the real
PostgreSQL (the session's throwaway database with the migrations applied)."""

from __future__ import annotations

import pytest

from fleet.mesh.pg_store import PgMeshStore
from fleet.mesh.sqlite_store import SQLiteMeshStore

MESH_TABLES = (
    "mesh_task_events, mesh_task_queue, mesh_health, mesh_pane_state, mesh_immune_state, "
    "mesh_antibodies, mesh_immune_events, mesh_event_cursor, mesh_breaker_state"
)


@pytest.fixture(scope="session")
def mesh_pg_url(pg_url) -> str:
    from fleet.store.migrations import apply_migrations

    apply_migrations(pg_url)
    return pg_url


def truncate_mesh(pg_url: str) -> None:
    """Empty the mesh tables: each test starts from a fresh mesh on the shared database."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {MESH_TABLES} RESTART IDENTITY")


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path):
    """A fresh mesh store on each backend."""
    if request.param == "sqlite":
        store = SQLiteMeshStore(tmp_path / "any-mesh.db")
    else:
        url = request.getfixturevalue("mesh_pg_url")
        truncate_mesh(url)
        store = PgMeshStore(url)
    yield store
    store.close()
