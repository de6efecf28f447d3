"""PostgreSQL backend of the Store (psycopg 3): claims and stage writes go through the SQL functions.

Works with a plain PostgreSQL and with Supabase's connection strings: the direct
connection (db.<ref>.supabase.co:5432), the session pooler (…pooler.supabase.com:5432)
and the transaction pooler (…:6543). The transaction pooler hands each transaction to
any server connection, where a statement prepared on another one does not exist, so
server-side prepared statements are off (`prepare_threshold=None`); every method is a
single autocommitted statement, which is all a transaction pooler can carry.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, TypeVar

from pydantic import SecretStr

from fleet.errors import ConfigError, InvalidTransition, StaleLease, StoreUnavailable
from fleet.models import EvolutionState, FleetConfig, Stage, Task, Trajectory

T = TypeVar("T")

# Prefixes of the messages the SQL functions raise (SQLSTATE P0001); see 0001_pipeline.sql.
_REFUSALS: dict[str, type[Exception]] = {
    "stale_lease:": StaleLease,
    "invalid_transition:": InvalidTransition,
}
_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _utc(value: datetime) -> datetime:
    # Naive datetimes are read as local time, as the SQLite store does.
    return value.astimezone(timezone.utc)


def _describe(conninfo: str) -> tuple[str, str | None]:
    """Where a conninfo points (user@host:port/db) and its password, if it has one."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        # A config mistake, not an outage: retrying will not help. The driver's message
        # may quote the string, so it is redacted.
        raise ConfigError(
            f"invalid PostgreSQL connection string: {redact(str(exc).strip())} — expected "
            "postgresql://user@host:5432/db or 'host=… dbname=…' (FLEET_STORE_URL)"
        ) from None
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
    if params.get("user"):
        where = f"{params['user']}@{where}"
    password = params.get("password")
    return where, str(password) if password else None


def redact(text: str, password: str | None = None) -> str:
    """`text` with any password (URI userinfo, password=…, or the known one) masked."""
    if password:
        text = text.replace(password, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _KEYWORD_PASSWORD.sub(r"\1***", text)


class PostgresStore:
    """Store on PostgreSQL; one connection shared by threads under a lock, reopened if it drops."""

    def __init__(
        self, conninfo: str | SecretStr, *, apply_schema: bool = True, connect_timeout: int = 10
    ):
        self._conninfo = conninfo if isinstance(conninfo, SecretStr) else SecretStr(conninfo)
        self._where, password = _describe(self._conninfo.get_secret_value())
        self._password = SecretStr(password) if password else None  # kept only to redact errors
        self._connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: Any = None
        if apply_schema:
            self._apply_schema()
        with self._lock:
            self._connection()

    def __repr__(self) -> str:
        return f"PostgresStore({self._where!r})"

    # Connection handling ---------------------------------------------------------
    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        detail = redact(
            str(exc).strip(), self._password.get_secret_value() if self._password else None
        )
        return StoreUnavailable(
            f"PostgreSQL store at {self._where}: {what}: {detail} — check that the server is "
            "up and FLEET_STORE_URL (or the PostgresStore block) points at it"
        )

    def _apply_schema(self) -> None:
        import psycopg

        from fleet.store.migrations import apply_migrations

        try:
            apply_migrations(self._conninfo.get_secret_value())
        except psycopg.OperationalError as exc:
            raise self._unavailable("cannot connect to apply the schema", exc) from None
        except psycopg.Error as exc:
            raise self._unavailable("applying supabase/migrations failed", exc) from None

    def _connection(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            try:
                self._conn = psycopg.connect(
                    self._conninfo.get_secret_value(),
                    autocommit=True,
                    prepare_threshold=None,  # transaction pooler: no server-side prepares
                    connect_timeout=self._connect_timeout,
                    application_name="fleet",
                    row_factory=dict_row,
                )
            except psycopg.Error as exc:
                # `from None`: the driver's error may quote the connection string.
                raise self._unavailable("cannot connect", exc) from None
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # already gone: nothing left to release
                pass
            self._conn = None

    def _run(self, work: Callable[[Any], T], *, retry_safe: bool = True) -> T:
        """Run `work(conn)`; a connection found dropped is reopened, and the call repeated
        once when repeating it cannot do anything twice (`retry_safe`)."""
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return work(conn)
                except psycopg.errors.RaiseException as exc:
                    message = exc.diag.message_primary or str(exc)
                    for prefix, error in _REFUSALS.items():
                        if message.startswith(prefix):
                            raise error(message.removeprefix(prefix).strip()) from None
                    raise self._unavailable("query failed", exc) from exc
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    lost = conn.closed or conn.broken
                    if lost:
                        self._drop()
                        if retry_safe and attempt == 1:
                            continue
                    raise self._unavailable(
                        "connection lost" if lost else "query failed", exc
                    ) from None
                except psycopg.Error as exc:
                    raise self._unavailable("query failed", exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        ids = list(dict.fromkeys(app_ids))
        if not ids:
            return
        self._run(lambda conn: conn.execute(
            "INSERT INTO app_evolution_states (app_id, updated_at) "
            "SELECT unnest(%s::text[]), %s ON CONFLICT (app_id) DO NOTHING",
            (ids, _utc(now)),
        ))

    def get_state(self, app_id: str) -> EvolutionState | None:
        rows = self._rows("SELECT * FROM app_evolution_states WHERE app_id = %s", (app_id,))
        return EvolutionState.model_validate(rows[0]) if rows else None

    def list_states(self) -> list[EvolutionState]:
        rows = self._rows("SELECT * FROM app_evolution_states ORDER BY app_id")
        return [EvolutionState.model_validate(r) for r in rows]

    def claim_app(
        self, app_id: str, owner: str, run_id: str, now: datetime, lease_seconds: float,
        steal_from: str | None = None, max_in_flight: int | None = None,
    ) -> int | None:
        # Not retried on a dropped connection: the claim may have committed before the drop.
        row = self._run(
            lambda conn: conn.execute(
                "SELECT fleet_claim_app(%s, %s, %s, %s, %s, %s, %s) AS epoch",
                (app_id, owner, run_id, _utc(now), float(lease_seconds), steal_from, max_in_flight),
            ).fetchone(),
            retry_safe=False,
        )
        return row["epoch"]

    def release_app(self, app_id: str, epoch: int) -> None:
        self._run(lambda conn: conn.execute(
            "UPDATE app_evolution_states SET owner = NULL, lease_until = NULL "
            "WHERE app_id = %s AND epoch = %s",
            (app_id, epoch),
        ))

    def set_stage(
        self, app_id: str, stage: Stage, epoch: int, now: datetime,
        error: str | None = None, lease_seconds: float | None = None,
    ) -> EvolutionState:
        row = self._run(lambda conn: conn.execute(
            "SELECT * FROM fleet_set_stage(%s, %s, %s, %s, %s, %s)",
            (app_id, Stage(stage).value, epoch, _utc(now), error,
             float(lease_seconds) if lease_seconds else None),
        ).fetchone())
        return EvolutionState.model_validate(row)

    def reset_app(self, app_id: str, now: datetime) -> None:
        self._run(
            lambda conn: conn.execute("SELECT fleet_reset_app(%s, %s)", (app_id, _utc(now))),
            retry_safe=False,  # each reset bumps the epoch
        )

    # Tasks -----------------------------------------------------------------------
    def upsert_tasks(self, tasks: Iterable[Task], now: datetime) -> int:
        from psycopg.types.json import Jsonb

        # One row per key: ON CONFLICT cannot touch the same row twice in one statement.
        rows = {t.key: t for t in tasks}
        if not rows:
            return 0
        payload = Jsonb([
            {"task_key": k, "app_id": t.app_id, "source": t.source, "priority": t.priority,
             "description": t.description, "severity": t.severity, "file": t.file}
            for k, t in rows.items()
        ])
        # `xmax = 0` holds for rows this statement inserted, not for rows it updated.
        inserted = self._run(lambda conn: conn.execute(
            "INSERT INTO app_evolution_tasks (task_key, app_id, source, priority, description, "
            "severity, file, created_at, updated_at) "
            "SELECT t.task_key, t.app_id, t.source, t.priority, t.description, t.severity, t.file, "
            "%(now)s, %(now)s FROM jsonb_to_recordset(%(rows)s) AS t(task_key text, app_id text, "
            "source text, priority integer, description text, severity text, file text) "
            "ON CONFLICT (task_key) DO UPDATE SET priority = excluded.priority, "
            "severity = excluded.severity, updated_at = excluded.updated_at "
            "RETURNING (xmax = 0) AS inserted",
            {"now": _utc(now), "rows": payload},
        ).fetchall())
        return sum(1 for r in inserted if r["inserted"])

    def list_tasks(self, app_id: str, source: str | None = None) -> list[Task]:
        sql = "SELECT * FROM app_evolution_tasks WHERE app_id = %s"
        params: tuple = (app_id,)
        if source:
            sql += " AND source = %s"
            params += (source,)
        rows = self._rows(sql + " ORDER BY priority, created_at, task_key", params)
        return [
            Task.model_validate(dict(r))  # extra columns (task_key, timestamps) are ignored
            for r in rows
        ]

    # Trajectories ----------------------------------------------------------------
    def record_trajectory(self, trajectory: Trajectory) -> None:
        from psycopg.types.json import Jsonb

        t = trajectory
        self._run(lambda conn: conn.execute(
            "INSERT INTO trajectories (app_id, run_id, pipeline, skill_tasks, adversarial_issues, "
            "quality_score, outcome, reward, durations, error, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (app_id, run_id) DO NOTHING",
            (t.app_id, t.run_id, t.pipeline, t.skill_tasks, t.adversarial_issues,
             t.quality_score, t.outcome, t.reward, Jsonb(t.durations), t.error,
             _utc(t.created_at or datetime.now(timezone.utc))),
        ))

    def list_trajectories(self, app_id: str) -> list[Trajectory]:
        rows = self._rows(
            "SELECT * FROM trajectories WHERE app_id = %s ORDER BY created_at, run_id", (app_id,)
        )
        return [Trajectory.model_validate(r) for r in rows]

    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        ids = list(app_ids)
        if not ids:
            return {}
        rows = self._rows(
            "SELECT app_id, reward_mean FROM fleet_reward_means(%s::text[])", (ids,)
        )
        return {r["app_id"]: r["reward_mean"] for r in rows}

    # Fleet config and cohorts ----------------------------------------------------
    def get_fleet_config(self) -> FleetConfig:
        rows = self._rows("SELECT key, value FROM fleet_config")
        return FleetConfig.model_validate({r["key"]: r["value"] for r in rows})

    def set_fleet_config(self, config: FleetConfig) -> None:
        from psycopg.types.json import Jsonb

        items = config.model_dump()
        self._run(lambda conn: conn.execute(
            "INSERT INTO fleet_config (key, value) "
            "SELECT key, value FROM jsonb_each(%s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (Jsonb(items),),
        ))

    def record_cohort(self, run_id: str, app_ids: list[str], now: datetime) -> None:
        from psycopg.types.json import Jsonb

        self._run(lambda conn: conn.execute(
            "INSERT INTO cohorts (run_id, app_ids, started_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (run_id) DO NOTHING",
            (run_id, Jsonb(list(app_ids)), _utc(now)),
        ))

    def finish_cohort(self, run_id: str, now: datetime) -> None:
        self._run(lambda conn: conn.execute(
            "UPDATE cohorts SET finished_at = %s WHERE run_id = %s AND finished_at IS NULL",
            (_utc(now), run_id),
        ))

    def completed_cohorts(self) -> int:
        rows = self._rows(
            "SELECT count(*) AS n FROM cohorts "
            "WHERE finished_at IS NOT NULL AND app_ids <> '[]'::jsonb"
        )
        return rows[0]["n"]

    # Leadership lease (not part of the Store protocol) ----------------------------
    def acquire_lease(
        self, name: str, holder: str, now: datetime, lease_seconds: float
    ) -> int | None:
        """Acquire or renew lease `name`; returns the fencing epoch, or None while another holds it."""
        row = self._run(
            lambda conn: conn.execute(
                "SELECT fleet_acquire_lease(%s, %s, %s, %s) AS epoch",
                (name, holder, _utc(now), float(lease_seconds)),
            ).fetchone(),
            retry_safe=False,
        )
        return row["epoch"]

    def release_lease(self, name: str, holder: str, epoch: int, now: datetime) -> bool:
        """Give the lease up early; False if `holder` at `epoch` no longer holds it."""
        row = self._run(lambda conn: conn.execute(
            "SELECT fleet_release_lease(%s, %s, %s, %s) AS released",
            (name, holder, epoch, _utc(now)),
        ).fetchone())
        return bool(row["released"])

    def close(self) -> None:
        with self._lock:
            self._drop()
