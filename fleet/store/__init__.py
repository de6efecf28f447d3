"""Store backends behind one protocol; `open_store(url)` picks one from a URL."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fleet.errors import ConfigError
from fleet.store.base import Store

if TYPE_CHECKING:
    from fleet.settings import FleetSettings


def open_store(url: str, *, settings: FleetSettings | None = None) -> Store:
    """sqlite:///path.db (default), postgresql://… (psycopg), supabase://… (REST).

    Supabase REST: `supabase` (the project at FLEET_SUPABASE_URL),
    `supabase://<ref>.supabase.co` or `https://<ref>.supabase.co`; the service key always
    comes from FLEET_SUPABASE_KEY (settings), never from the URL.
    """
    if url.startswith("sqlite:///"):
        from fleet.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from fleet.store.postgres import PostgresStore

        return PostgresStore(url, connections=settings.store_connections if settings else None)
    if url in ("supabase", "supabase://") or url.startswith(("supabase://", "https://", "http://")):
        return _open_supabase(url, settings)
    raise ConfigError(
        f"unsupported store URL {url.split('://')[0]!r}://… — use sqlite:///path/to/fleet.db, "
        "postgresql://user@host:5432/db or supabase://<ref>.supabase.co (FLEET_STORE_URL)"
    )


def _open_supabase(url: str, settings: FleetSettings | None) -> Store:
    from fleet.settings import get_settings
    from fleet.store.supabase_rest import SupabaseStore

    s = settings or get_settings()
    if url in ("supabase", "supabase://"):
        url = s.supabase_url
        if not url:
            raise ConfigError(
                "store URL 'supabase' needs the project URL: set FLEET_SUPABASE_URL="
                "https://<ref>.supabase.co"
            )
    elif url.startswith("supabase://"):
        url = "https://" + url.removeprefix("supabase://")
    if urlsplit(url).username or urlsplit(url).password:
        raise ConfigError(
            "the Supabase store URL must not carry credentials — put the service key in "
            "FLEET_SUPABASE_KEY"
        )
    if s.supabase_key is None or not s.supabase_key.get_secret_value():
        raise ConfigError(
            "the Supabase store needs the project's service_role key: set FLEET_SUPABASE_KEY "
            "(or use the SupabaseStore block)"
        )
    return SupabaseStore(
        url,
        s.supabase_key,
        timeout_seconds=s.http_timeout_seconds,
        allow_insecure=s.allow_insecure_transport,
    )


__all__ = ["Store", "open_store"]
