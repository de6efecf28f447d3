"""Opens the MeshStore named by a store URL (FLEET_STORE_URL): SQLite file or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from fleet.errors import ConfigError
from fleet.mesh.store import MeshStore


def open_mesh_store(url: str) -> MeshStore:
    """`sqlite:///path/fleet.db` → SQLiteMeshStore; `postgresql://…`, `postgres://…` →
    PgMeshStore."""
    if url.startswith("sqlite:///"):
        from fleet.mesh.sqlite_store import SQLiteMeshStore

        return SQLiteMeshStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from fleet.mesh.pg_store import PgMeshStore

        return PgMeshStore(url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ConfigError(
        f"unsupported mesh store URL scheme {scheme!r} — use sqlite:///path/to/fleet.db or "
        "postgresql://user@host:5432/db (for Supabase, its database connection string)"
    )
