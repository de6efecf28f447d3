"""Opens the MeshStore named by a store URL (FLEET_STORE_URL): SQLite file or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import ConfigError

if TYPE_CHECKING:
    from fleet.mesh.pg_store import PgMeshStore
    from fleet.mesh.sqlite_store import SQLiteMeshStore


# The concrete stores, not the MeshStore protocol: callers also use their ImmuneStore half.
def open_mesh_store(url: str) -> SQLiteMeshStore | PgMeshStore:
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


def mesh_store_url(settings, load_block=None) -> str:
    """The mesh's store URL: FLEET_STORE_BLOCK's database when a Block is configured (the mesh
    needs PostgreSQL itself, so a REST-only Block is refused), else FLEET_STORE_URL/SQLite.
    `load_block(name)` loads a saved Block (flows pass theirs; None outside a flow run)."""
    if not settings.store_block:
        return settings.resolved_store_url()
    if load_block is None:
        raise ConfigError(
            f"store block {settings.store_block!r} is configured but blocks can only "
            "be loaded inside a flow run — give --store-url or FLEET_STORE_URL"
        )
    conninfo = getattr(load_block(settings.store_block), "conninfo", None)
    if conninfo is None:
        raise ConfigError(
            f"store block {settings.store_block!r} has no database connection string; the mesh "
            "runs on PostgreSQL itself — use a fleet-postgres-store block or FLEET_STORE_URL"
        )
    return conninfo.get_secret_value()


def share_breaker_states(settings, load_block=None) -> bool:
    """Have this process write its circuit breakers' state changes to the mesh store, so the
    watchdog sees them (fleet.clients.breaker.share_states); False, with a warning, when the
    mesh store cannot be opened — sharing is a report, never a reason to fail a run."""
    import logging

    from fleet.clients.breaker import share_states
    from fleet.errors import FleetError

    try:
        share_states(open_mesh_store(mesh_store_url(settings, load_block)))
    except FleetError as exc:
        logging.getLogger(__name__).warning("breaker states stay local to this process: %s", exc)
        return False
    return True
