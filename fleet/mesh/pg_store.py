"""PostgreSQL backend of the MeshStore: claim and reconcile are the SQL functions of 0002_mesh.sql.

Connections, timeouts, reconnects and error mapping are the connector's
(fleet/store/pgconn.py); the statements are the named queries of fleet/mesh/queries.sql and
immune_queries.sql. The logic both backends share is fleet/mesh/sql_store.py's; here are only
PostgreSQL's own steps, each one statement that also appends its events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from pydantic import SecretStr

from fleet.mesh import rules
from fleet.mesh.immune_store import ImmuneOps
from fleet.mesh.sql_store import Params, Queries, Row, Tx
from fleet.mesh.store import QueuedTask, ReconcileCounts
from fleet.store import queries
from fleet.store.pgconn import PgConnector, Timeouts
from fleet.store.timestamps import utc

QUERIES = queries.load("fleet.mesh", "queries.sql")
IMMUNE = queries.load("fleet.mesh", "immune_queries.sql")
T = TypeVar("T")


class PgMeshStore(ImmuneOps):
    """MeshStore on PostgreSQL (or Supabase's database) through the shared connector.

    The connection is opened lazily and reopened after a drop; reads are repeated once on a
    fresh connection, writes are not (they may have committed). Statement and lock timeouts
    bound every call; every driver error surfaces as StoreUnavailable.
    """

    _mesh = QUERIES
    _immune = IMMUNE

    def __init__(
        self,
        conninfo: str | SecretStr,
        *,
        connect_timeout_seconds: float = 5,
        statement_timeout_seconds: float = 30,
        lock_timeout_seconds: float = 10,
    ):
        self._db = PgConnector(
            conninfo,
            label="PostgreSQL mesh store",
            advice="check the server is up and 0002_mesh.sql is applied",
            timeouts=Timeouts(
                connect_timeout_seconds, statement_timeout_seconds, lock_timeout_seconds
            ),
            application_name="fleet-mesh",
        )

    def __repr__(self) -> str:
        return f"PgMeshStore({self._db.where!r})"

    @property
    def conninfo(self) -> SecretStr:
        return self._db.conninfo

    # Backend primitives (fleet/mesh/sql_store.py) ---------------------------------
    def _time(self, value: datetime | None) -> datetime | None:
        return utc(value) if value is not None else None

    def _json(self, value: Any) -> Any:
        from psycopg.types.json import Jsonb

        return Jsonb(value)

    def _tx(self) -> Any:
        """A transaction on the connection itself (tests reach the tables through it)."""
        return self._db.transaction()

    def _query(self, sql: str, params: Any = ()) -> list[Row]:
        return self._db.fetch(sql, params)

    def _write(self, work: Callable[[Tx], T], queries: Mapping[str, str] | None = None) -> T:
        """`work(tx)` in one transaction; not repeated after a drop (it may have committed)."""
        return self._db.run(
            lambda conn: work(Tx(conn, queries or QUERIES, self)),
            transaction=True,
            retry_safe=False,
        )

    def _read_together(self, *names: str) -> list[list[Row]]:
        # One transaction, so the counts and the oldest row are of one moment.
        return self._db.run(
            lambda conn: [conn.execute(QUERIES[q]).fetchall() for q in names], transaction=True
        )

    def _put(self, query: str, /, **params: Any) -> None:
        # An upsert of the whole row: repeating it after a drop writes the same row.
        self._db.execute(QUERIES[query], params)

    def _requeue_left(self, tx: Tx, machine_id: str, now: datetime) -> int:
        return tx.one("requeue_on_leave", machine_id=machine_id, now=utc(now))["n"]

    def _requeue_down(
        self, tx: Tx, machine_id: str, now: datetime, max_attempts: int
    ) -> tuple[int, int]:
        moved = tx.one(
            "requeue_on_down", machine_id=machine_id, now=utc(now), max_attempts=max_attempts
        )
        return moved["requeued"], moved["dead_lettered"]

    def _enqueue(self, params: dict[str, Any], now: datetime) -> None:
        # The statement appends the queued event. Idempotent on task_id: repeating it
        # cannot add a second row.
        self._db.execute(QUERIES["enqueue"], params, retry_safe=True)

    def _fenced(self, query: str, now: datetime, params: Params, queries: Queries) -> bool:
        # The statement appends its own event.
        sql = queries[query]
        row = self._db.fetch_one(sql, {**params, "now": utc(now)}, retry_safe=False)
        return row is not None and row["n"] == 1

    # PostgreSQL's own -------------------------------------------------------------
    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        rows = self._db.fetch(
            QUERIES["claim"],
            {"machine_id": machine_id, "now": utc(now), "limit": limit},
            retry_safe=False,  # the claim may have committed before the drop
        )
        return [self._task_of(r) for r in rows]

    def _reconcile(
        self, now: datetime, limits: rules.Thresholds, by_machine: dict[str, rules.Thresholds]
    ) -> ReconcileCounts:
        row = self._db.fetch_one(
            QUERIES["reconcile_by_machine" if by_machine else "reconcile"],
            {
                "now": utc(now),
                **dataclasses.asdict(limits),
                "machines": list(by_machine),
                "machine_orphan_seconds": [t.orphan_seconds for t in by_machine.values()],
                "machine_stuck_seconds": [t.stuck_seconds for t in by_machine.values()],
            },
            retry_safe=False,
        )
        return ReconcileCounts(**(row or {}))

    def close(self) -> None:
        self._db.close()
