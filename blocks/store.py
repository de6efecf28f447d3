"""Prefect Blocks for the Store backends: PostgreSQL (conninfo), Supabase REST (URL + service key).

The secrets stay SecretStr in the Block (the Prefect UI and API show them masked); only
get_client() hands them to the store, which opens them where it builds its connection.
"""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from fleet.settings import get_settings
from fleet.store.postgres import PostgresStore
from fleet.store.supabase_rest import SupabaseStore


class PostgresStoreBlock(Block):
    """A PostgreSQL (or Supabase direct / pooler) connection string for the fleet store."""

    _block_type_name: ClassVar[str] = "Fleet PostgreSQL Store"
    _block_type_slug: ClassVar[str] = "fleet-postgres-store"
    _description: ClassVar[str] = (
        "Fleet Evolution Engine store on PostgreSQL: app stages, tasks, trajectories, config. "
        "Supabase's direct, session-pooler and transaction-pooler (port 6543) strings all work."
    )

    conninfo: SecretStr = Field(
        description="e.g. postgresql://postgres.<ref>:<password>@aws-0-<region>.pooler.supabase.com:5432/postgres"
    )
    apply_schema: bool = Field(
        default=True, description="apply supabase/migrations (idempotent) when the store opens"
    )

    def get_client(self) -> PostgresStore:
        return PostgresStore(self.conninfo, apply_schema=self.apply_schema)


class SupabaseStoreBlock(Block):
    """A Supabase project URL and its service_role key, for the REST store."""

    _block_type_name: ClassVar[str] = "Fleet Supabase Store"
    _block_type_slug: ClassVar[str] = "fleet-supabase-store"
    _description: ClassVar[str] = (
        "Fleet Evolution Engine store over Supabase's REST API (PostgREST); the project must "
        "have supabase/migrations applied."
    )

    url: str = Field(description="e.g. https://<project-ref>.supabase.co")
    service_key: SecretStr = Field(description="the project's service_role key (not the anon key)")
    allow_insecure: bool = Field(
        default=False, description="allow plain http:// to a non-loopback host"
    )

    def get_client(self) -> SupabaseStore:
        settings = get_settings()
        return SupabaseStore(
            self.url,
            self.service_key,
            timeout_seconds=settings.http_timeout_seconds,
            allow_insecure=self.allow_insecure or settings.allow_insecure_transport,
        )
