"""Applies supabase/migrations/*.sql to a PostgreSQL database, in file-name order.

Every migration is written to be re-runnable (IF NOT EXISTS, CREATE OR REPLACE), so
applying the whole directory twice is a no-op; an advisory lock keeps two appliers apart.
"""

from __future__ import annotations

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
_LOCK_KEY = 0x0F1EE7  # pg_advisory_xact_lock key shared by every applier


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


def apply_migrations(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migration in one transaction; returns the file names applied."""
    import psycopg

    files = migration_files(directory)
    with psycopg.connect(conninfo, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        for path in files:
            conn.execute(path.read_text())
        conn.commit()
    return [p.name for p in files]
