"""Applies the schema migrations (supabase/migrations/*.sql) to PostgreSQL, in file-name order.

Where they are: `supabase/migrations/` is the canonical directory (the Supabase CLI's
`supabase db push` reads it). The wheel ships the same files as `fleet/migrations/` (hatch
`force-include` in pyproject.toml); a source checkout finds them next to the package. Either
way they are located from the package, never from the working directory.

Every migration is written to be re-runnable (IF NOT EXISTS, CREATE OR REPLACE), so
applying the whole directory twice is a no-op. Each applied file is recorded with its
checksum in `fleet_schema_migrations`, and a store that starts on an up-to-date database
applies nothing (an edited file is applied again with every file after it): re-running the
DDL would take ACCESS EXCLUSIVE locks that queue behind (and block) every open read. An
advisory lock keeps two appliers apart.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

_LOCK_KEY = 0x0F1EE7  # pg_advisory_xact_lock key shared by every applier
_LEDGER = """
CREATE TABLE IF NOT EXISTS fleet_schema_migrations (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migrations_dir() -> Traversable:
    """The migrations shipped in the wheel (fleet/migrations), else the checkout's
    supabase/migrations beside the package."""
    package = resources.files("fleet")
    shipped = package.joinpath("migrations")
    if shipped.is_dir():
        return shipped
    return Path(str(package)).parent / "supabase" / "migrations"


def migration_files(directory: Traversable | None = None) -> list[Traversable]:
    where = migrations_dir() if directory is None else directory
    return sorted((p for p in where.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)


def apply_migrations(
    conninfo: str, directory: Traversable | None = None, force: bool = False
) -> list[str]:
    """Apply, in one transaction, each migration not yet recorded with its current checksum
    (every one with `force`); returns the file names applied."""
    import psycopg

    wanted = {
        p.name: (p, hashlib.sha256(p.read_bytes()).hexdigest()) for p in migration_files(directory)
    }
    with psycopg.connect(conninfo, autocommit=False) as conn:
        if not force and not _pending(conn, wanted):
            return []  # the common case: read-only, no locks beyond the ledger read
        conn.rollback()
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_LEDGER)
        pending = sorted(wanted) if force else _pending(conn, wanted)
        for name in pending:
            path, checksum = wanted[name]
            conn.execute(path.read_text(encoding="utf-8"))
            conn.execute(
                "INSERT INTO fleet_schema_migrations (name, checksum) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
                (name, checksum),
            )
        conn.commit()
    return pending


def _pending(conn: Any, wanted: dict[str, tuple[Traversable, str]]) -> list[str]:
    if conn.execute("SELECT to_regclass('fleet_schema_migrations')").fetchone()[0] is None:
        return sorted(wanted)
    applied = dict(conn.execute("SELECT name, checksum FROM fleet_schema_migrations").fetchall())
    names = sorted(wanted)
    first = next((i for i, n in enumerate(names) if applied.get(n) != wanted[n][1]), len(names))
    # Every file after a pending one is applied again: later files may re-grant or redefine
    # what an earlier one revokes or replaces (0004's dashboard grants after 0001's REVOKE ALL).
    return names[first:]
