"""PostgreSQL backend of the Store (psycopg 3): claims and stage writes are the SQL functions.

Works with a plain PostgreSQL and with Supabase's connection strings: the direct
connection (db.<ref>.supabase.co:5432), the session pooler (…pooler.supabase.com:5432)
and the transaction pooler (…:6543). Connections, timeouts, reconnects and error mapping
are the connector's (fleet/store/pgconn.py); the statements are the named queries of
fleet/store/queries.sql.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from fleet.models import EvolutionState, FleetConfig, Stage, Task
from fleet.store import queries
from fleet.store.base import EffectKind, task_row
from fleet.store.pgconn import PgConnector, Timeouts, redact
from fleet.store.sql import SqlStore
from fleet.store.timestamps import utc

__all__ = ["PostgresStore", "redact"]

QUERIES = queries.load("fleet.store", "queries.sql")


class PostgresStore(SqlStore):
    """Store on PostgreSQL; up to `connections` connections shared by threads (default:
    FLEET_STORE_CONNECTIONS), each reopened if it drops."""

    def __init__(
        self,
        conninfo: str | SecretStr,
        *,
        apply_schema: bool = True,
        connect_timeout: int = 10,
        connections: int | None = None,
    ):
        if connections is None:
            from fleet.settings import get_settings

            connections = get_settings().store_connections
        self._db = PgConnector(
            conninfo,
            label="PostgreSQL store",
            advice="check that the server is up and FLEET_STORE_URL (or the PostgresStore "
            "block) points at it",
            timeouts=Timeouts(connect=connect_timeout),
            connections=connections,
        )
        if apply_schema:
            self._apply_schema()
        self._db.run(lambda conn: None)  # connect now: a wrong URL fails here, not mid-run

    def __repr__(self) -> str:
        return f"PostgresStore({self._db.where!r})"

    def _apply_schema(self) -> None:
        import psycopg

        from fleet.store.migrations import apply_migrations

        try:
            apply_migrations(self._db.conninfo.get_secret_value())
        except psycopg.OperationalError as exc:
            # An outage like any failed connect (pgconn): a starting cohort waits it out.
            raise self._db.unavailable(
                "cannot connect to apply the schema", exc, unreachable=True
            ) from None
        except psycopg.Error as exc:
            raise self._db.unavailable("applying the migrations failed", exc) from None

    def _rows(self, query: str, /, **params: Any) -> list[dict[str, Any]]:
        return self._db.fetch(QUERIES[query], params)

    def _one(self, query: str, /, *, retry_safe: bool = True, **params: Any) -> dict[str, Any]:
        row = self._db.fetch_one(QUERIES[query], params, retry_safe=retry_safe)
        assert row is not None, f"{query} returns one row"
        return row

    def _write(self, query: str, /, **params: Any) -> None:
        self._db.execute(QUERIES[query], params)

    def _time(self, value: datetime) -> datetime:
        return utc(value)

    def _json(self, value: Any) -> Any:
        from psycopg.types.json import Jsonb

        return Jsonb(value)

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        ids = list(dict.fromkeys(app_ids))
        if ids:
            self._write("ensure_apps", app_ids=ids, now=utc(now))

    def claim_app(
        self,
        app_id: str,
        owner: str,
        run_id: str,
        now: datetime,
        lease_seconds: float,
        steal_from: str | None = None,
        max_in_flight: int | None = None,
    ) -> int | None:
        # Not retried on a dropped connection: the claim may have committed before the drop.
        row = self._one(
            "claim_app",
            retry_safe=False,
            app_id=app_id,
            owner=owner,
            run_id=run_id,
            now=utc(now),
            lease_seconds=float(lease_seconds),
            steal_from=steal_from,
            max_in_flight=max_in_flight,
        )
        return row["epoch"]

    def set_stage(
        self,
        app_id: str,
        stage: Stage,
        epoch: int,
        now: datetime,
        error: str | None = None,
        lease_seconds: float | None = None,
    ) -> EvolutionState:
        row = self._one(
            "set_stage",
            app_id=app_id,
            stage=Stage(stage).value,
            epoch=epoch,
            now=utc(now),
            error=error,
            lease_seconds=float(lease_seconds) if lease_seconds else None,
        )
        return EvolutionState.model_validate(row)

    def renew_claim(self, app_id: str, epoch: int, now: datetime, lease_seconds: float) -> bool:
        # Safe to repeat: a second renewal at the same epoch only sets the same expiry.
        row = self._one(
            "renew_claim",
            app_id=app_id,
            epoch=epoch,
            now=utc(now),
            lease_seconds=float(lease_seconds),
        )
        return bool(row["renewed"])

    def reset_app(self, app_id: str, now: datetime) -> None:
        # Not retried: each reset bumps the epoch.
        self._one("reset_app", retry_safe=False, app_id=app_id, now=utc(now))

    # Effects ledger --------------------------------------------------------------
    def record_effect(
        self, app_id: str, key: str, kind: EffectKind, value: str, epoch: int, now: datetime
    ) -> str:
        # Safe to repeat: the first value under the key wins and is returned again.
        row = self._one(
            "record_effect",
            app_id=app_id,
            key=key,
            kind=kind,
            value=value,
            epoch=epoch,
            now=utc(now),
        )
        return str(row["value"])

    # Tasks -----------------------------------------------------------------------
    def upsert_tasks(self, tasks: Iterable[Task], now: datetime) -> int:
        rows = {t.key: t for t in tasks}
        if not rows:
            return 0
        payload = self._json([task_row(t) for t in rows.values()])
        inserted = self._rows("upsert_tasks", now=utc(now), rows=payload)
        return sum(1 for r in inserted if r["inserted"])

    # Trajectories ----------------------------------------------------------------
    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        ids = list(app_ids)
        if not ids:
            return {}
        return {r["app_id"]: r["reward_mean"] for r in self._rows("reward_means", app_ids=ids)}

    # Fleet config and cohorts ----------------------------------------------------
    def set_fleet_config(self, config: FleetConfig) -> None:
        self._write("set_fleet_config", items=self._json(config.model_dump()))

    # Leadership leases -----------------------------------------------------------
    def acquire_lease(
        self, name: str, holder: str, now: datetime, lease_seconds: float
    ) -> int | None:
        """Acquire or renew lease `name`; the fencing epoch, or None while another holds it."""
        row = self._one(
            "acquire_lease",
            retry_safe=False,
            name=name,
            holder=holder,
            now=utc(now),
            lease_seconds=float(lease_seconds),
        )
        return row["epoch"]

    def release_lease(self, name: str, holder: str, epoch: int, now: datetime) -> bool:
        """Give the lease up early; False if `holder` at `epoch` no longer holds it."""
        row = self._one("release_lease", name=name, holder=holder, epoch=epoch, now=utc(now))
        return bool(row["released"])

    def close(self) -> None:
        self._db.close()
