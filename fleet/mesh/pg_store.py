"""PostgreSQL backend of the MeshStore: claim and reconcile are the SQL functions of 0002_mesh.sql.

Connections, timeouts, reconnects and error mapping are the connector's
(fleet/store/pgconn.py); the statements are the named queries of fleet/mesh/queries.sql.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from fleet.mesh import rules
from fleet.mesh.immune import task_type
from fleet.mesh.immune_store import PgImmuneOps
from fleet.mesh.store import (
    PROTOCOL_GENERATION,
    MachineHealth,
    MachineIdentity,
    QueuedTask,
    ReconcileCounts,
    TaskEvent,
    TaskStatus,
    default_max_attempts,
    unknown_machine,
)
from fleet.store import queries
from fleet.store.pgconn import PgConnector, Timeouts
from fleet.store.timestamps import utc

QUERIES = queries.load("fleet.mesh", "queries.sql")


def _task(row: dict[str, Any]) -> QueuedTask:
    return QueuedTask(**{**row, "status": TaskStatus(row["status"])})


def _machine(row: dict[str, Any]) -> MachineHealth:
    return MachineHealth(
        machine_id=row["machine_id"],
        mesh_id=row["mesh_id"],
        role=row["role"],
        generation=row["generation"],
        last_heartbeat=row["last_heartbeat"],
        health_url=row["health_url"],
        active_tasks=row["active_tasks"] or [],
        status=row["status"],
        failed_confirmations=row["failed_confirmations"],
    )


def _jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)


class _Tx:
    """One transaction's connection, reaching the named queries by name."""

    def __init__(self, conn: Any):
        self._conn = conn

    def find(self, query: str, /, **params: Any) -> dict[str, Any] | None:
        """The first row, or None."""
        return self._conn.execute(QUERIES[query], params).fetchone()

    def one(self, query: str, /, **params: Any) -> dict[str, Any]:
        """The row a statement always returns (a count, a function's result)."""
        row = self.find(query, **params)
        assert row is not None, f"{query} returns a row"
        return row

    def execute(self, query: str, /, **params: Any) -> None:
        self._conn.execute(QUERIES[query], params)

    def event(
        self,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self._conn.execute(
            QUERIES["append_event"],
            {
                "task_id": task_id,
                "event": event,
                "machine_id": machine_id,
                "now": utc(now),
                "detail": _jsonb(detail or {}),
            },
        )


class PgMeshStore(PgImmuneOps):
    """MeshStore on PostgreSQL (or Supabase's database) through the shared connector.

    The connection is opened lazily and reopened after a drop; reads are repeated once on a
    fresh connection, writes are not (they may have committed). Statement and lock timeouts
    bound every call; every driver error surfaces as StoreUnavailable.
    """

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

    def _read(self, query: str, /, **params: Any) -> list[dict[str, Any]]:
        return self._db.fetch(QUERIES[query], params)

    # The immune mixin (fleet/mesh/immune_store.py) works on the connection itself.
    def _tx(self) -> Any:
        return self._db.transaction()

    def _query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return self._db.fetch(sql, params)

    def _write(self, work: Any) -> Any:
        """`work(tx)` in one transaction; not repeated after a drop (it may have committed)."""
        return self._db.run(lambda conn: work(_Tx(conn)), transaction=True, retry_safe=False)

    # Machines --------------------------------------------------------------------
    def heartbeat(
        self,
        identity: MachineIdentity,
        now: datetime,
        health_url: str | None,
        active_tasks: list[str],
    ) -> None:
        def work(tx: _Tx) -> None:
            prev = tx.find("lock_machine", machine_id=identity.machine_id)
            tx.execute(
                "heartbeat",
                machine_id=identity.machine_id,
                mesh_id=identity.mesh_id,
                role=identity.role,
                generation=identity.generation,
                now=utc(now),
                health_url=health_url,
                active_tasks=_jsonb(list(active_tasks)),
            )
            if prev is not None and prev["status"] in rules.GONE_MACHINE_STATUSES:
                tx.event(
                    None, "MachineUp", identity.machine_id, now, {"previous_status": prev["status"]}
                )

        self._write(work)

    def leave(self, machine_id: str, now: datetime) -> int:
        def work(tx: _Tx) -> int:
            tx.execute("mark_left", machine_id=machine_id, now=utc(now))
            moved = tx.one("requeue_on_leave", machine_id=machine_id, now=utc(now))["n"]
            tx.event(None, "MachineLeft", machine_id, now, {"requeued": moved})
            return moved

        return self._write(work)

    def machines(self) -> list[MachineHealth]:
        return [_machine(r) for r in self._read("machines")]

    def record_confirmation(
        self, machine_id: str, failed: bool, now: datetime, *, stale_before: datetime | None = None
    ) -> MachineHealth:
        def work(tx: _Tx) -> MachineHealth:
            row = tx.find("lock_machine", machine_id=machine_id)
            if row is None:
                raise unknown_machine(machine_id)
            status, count = rules.confirmation_update(
                row["status"],
                row["failed_confirmations"],
                row["last_heartbeat"],
                failed,
                utc(stale_before) if stale_before else None,
            )
            if (status, count) != (row["status"], row["failed_confirmations"]):
                row = tx.one(
                    "set_machine_status",
                    machine_id=machine_id,
                    status=status,
                    failed_confirmations=count,
                    now=utc(now),
                )
            return _machine(row)

        return self._write(work)

    def mark_down(
        self,
        machine_id: str,
        now: datetime,
        *,
        stale_before: datetime | None = None,
        max_attempts: int | None = None,
    ) -> int:
        max_attempts = default_max_attempts() if max_attempts is None else max_attempts

        def work(tx: _Tx) -> int:
            row = tx.find("lock_machine", machine_id=machine_id)
            if row is None:
                raise unknown_machine(machine_id)
            if stale_before is not None and row["last_heartbeat"] >= utc(stale_before):
                return -1  # it heartbeated while we were confirming: not down
            tx.execute("mark_down", machine_id=machine_id, now=utc(now))
            moved = tx.one(
                "requeue_on_down", machine_id=machine_id, now=utc(now), max_attempts=max_attempts
            )
            tx.event(None, "MachineDown", machine_id, now, dict(moved))
            return moved["requeued"] + moved["dead_lettered"]

        return self._write(work)

    # Queue -----------------------------------------------------------------------
    def enqueue(
        self,
        kind: str,
        command: list[str],
        now: datetime,
        target: str | None = None,
        model: str | None = None,
        task_id: str | None = None,
        *,
        mesh_id: str | None = None,
        generation: int | None = None,
    ) -> str:
        task_id = task_id or uuid.uuid4().hex
        if mesh_id and generation is None:
            generation = PROTOCOL_GENERATION
        self._db.execute(
            QUERIES["enqueue"],
            {
                "task_id": task_id,
                "kind": kind,
                "command": _jsonb(list(command)),
                "target": target,
                "model": model,
                "now": utc(now),
                "task_type": task_type(kind, command),
                "mesh_id": mesh_id or None,
                "generation": generation,
            },
            retry_safe=True,
        )  # idempotent on task_id: repeating it cannot add a second row
        return task_id

    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        rows = self._db.fetch(
            QUERIES["claim"],
            {"machine_id": machine_id, "now": utc(now), "limit": limit},
            retry_safe=False,  # the claim may have committed before the drop
        )
        return [_task(r) for r in rows]

    def _fenced(self, query: str, **params: Any) -> bool:
        row = self._db.fetch_one(QUERIES[query], params, retry_safe=False)
        return row is not None and row["n"] == 1

    def transition(
        self,
        task_id: str,
        machine_id: str,
        status: TaskStatus,
        now: datetime,
        *,
        pane_id: str | None = None,
        output: str | None = None,
        error: str | None = None,
        claim_seq: int | None = None,
    ) -> bool:
        status = rules.agent_target(status)
        return self._fenced(
            "transition",
            status=status.value,
            now=utc(now),
            pane_id=pane_id,
            output=output,
            error=error,
            finished=status in (TaskStatus.DONE, TaskStatus.FAILED),
            task_id=task_id,
            machine_id=machine_id,
            claim=claim_seq,
        )

    def progress(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        note: str | None = None,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        return self._fenced(
            "progress",
            now=utc(now),
            task_id=task_id,
            machine_id=machine_id,
            note=note,
            claim=claim_seq,
        )

    def handoff(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        checkpoint: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        return self._fenced(
            "handoff",
            checkpoint=checkpoint,
            task_id=task_id,
            machine_id=machine_id,
            now=utc(now),
            claim=claim_seq,
        )

    def get_task(self, task_id: str) -> QueuedTask | None:
        rows = self._read("get_task", task_id=task_id)
        return _task(rows[0]) if rows else None

    def tasks_of(self, machine_id: str) -> list[QueuedTask]:
        return [_task(r) for r in self._read("tasks_of", machine_id=machine_id)]

    def events(self, task_id: str | None = None, *, event: str | None = None) -> list[TaskEvent]:
        return [
            TaskEvent(
                task_id=r["task_id"],
                event=r["event"],
                machine_id=r["machine_id"],
                at=r["at"],
                detail=r["detail"] or {},
            )
            for r in self._read("events", task_id=task_id, event=event)
        ]

    def queue_stats(self, now: datetime) -> dict[str, Any]:
        def work(conn: Any) -> tuple[list[dict[str, Any]], datetime | None]:
            depth = conn.execute(QUERIES["queue_depth"]).fetchall()
            return depth, conn.execute(QUERIES["oldest_queued"]).fetchone()["t"]

        rows, oldest_at = self._db.run(work, transaction=True)
        depth = {s.value: 0 for s in TaskStatus} | {r["status"]: r["n"] for r in rows}
        return {
            "depth": depth,
            "oldest_queued_age_seconds": (utc(now) - oldest_at).total_seconds()
            if oldest_at
            else None,
            "dead_letter": depth[TaskStatus.DEAD_LETTER.value],
        }

    # Reconciler -------------------------------------------------------------------
    def reconcile(
        self,
        now: datetime,
        *,
        orphan_seconds: float,
        stuck_seconds: float,
        expiry_seconds: float,
        max_attempts: int,
        by_machine: Mapping[str, rules.Thresholds] | None = None,
    ) -> ReconcileCounts:
        own = dict(by_machine or {})
        row = self._db.fetch_one(
            QUERIES["reconcile_by_machine" if own else "reconcile"],
            {
                "now": utc(now),
                "orphan_seconds": orphan_seconds,
                "stuck_seconds": stuck_seconds,
                "expiry_seconds": expiry_seconds,
                "max_attempts": max_attempts,
                "machines": list(own),
                "machine_orphan_seconds": [t.orphan_seconds for t in own.values()],
                "machine_stuck_seconds": [t.stuck_seconds for t in own.values()],
            },
            retry_safe=False,
        )
        return ReconcileCounts(**(row or {}))

    # Panes ------------------------------------------------------------------------
    def set_pane_state(
        self,
        machine_id: str,
        pane_id: str,
        now: datetime,
        *,
        task_id: str | None,
        alive: bool,
        context_ratio: float | None = None,
        claim_seq: int | None = None,
    ) -> None:
        # An upsert of the whole row: repeating it after a drop writes the same row.
        self._db.execute(
            QUERIES["set_pane_state"],
            {
                "machine_id": machine_id,
                "pane_id": pane_id,
                "task_id": task_id,
                "claim": claim_seq,
                "alive": alive,
                "context_ratio": context_ratio,
                "now": utc(now),
            },
        )

    def pane_states(self, machine_id: str | None = None) -> list[dict[str, Any]]:
        return self._read("pane_states", machine_id=machine_id)

    def close(self) -> None:
        self._db.close()

    # Heartbeat history (0008_heartbeat_log.sql) -----------------------------------
    def heartbeat_log(self, since: datetime, until: datetime) -> dict[str, list[datetime]]:
        """Every heartbeat logged in [since, until], per machine, oldest first (the log keeps
        8 days)."""
        beats: dict[str, list[datetime]] = {}
        for r in self._read("heartbeat_log", since=utc(since), until=utc(until)):
            beats.setdefault(r["machine_id"], []).append(utc(r["at"]))
        return beats
