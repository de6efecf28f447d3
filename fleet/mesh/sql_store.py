"""The MeshStore's logic over SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies only what truly differs: how a transaction and a read run, how a
timestamp and a JSON value are written and read back, and the steps its SQL does its own
way (PostgreSQL's claim, requeues, reconcile and fenced writes are single statements or SQL
functions that append their events themselves; SQLite runs their twins in Python).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from contextlib import closing
from datetime import datetime
from typing import Any, TypeVar

from fleet.mesh import rules
from fleet.mesh.immune import task_type
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
from fleet.store.sql import SqlValues
from fleet.store.timestamps import utc

T = TypeVar("T")
Row = Any  # a dict (psycopg's dict_row) or a sqlite3.Row: both read by column name
Params = dict[str, Any]
Queries = Mapping[str, str]  # named queries (fleet/store/queries.py)


def fence(task_id: str, machine_id: str, claim_seq: int | None) -> Params:
    """The parameters every fenced write names: the task, its claimer and (None = any) claim."""
    return {"task_id": task_id, "machine_id": machine_id, "claim": claim_seq}


class Tx:
    """One transaction's connection, reaching named queries by name."""

    def __init__(self, conn: Any, queries: Mapping[str, str], store: SqlMeshStore):
        self._conn = conn
        self._queries = queries
        self._store = store

    def execute(self, query: str, /, **params: Any) -> Any:
        """Run `query`; the driver's cursor (rowcount, fetchone, fetchall)."""
        return self._conn.execute(self._queries[query], params)

    def find(self, query: str, /, **params: Any) -> Row | None:
        """The first row, or None."""
        return self.execute(query, **params).fetchone()

    def one(self, query: str, /, **params: Any) -> Row:
        """The row a statement always returns (a count, a function's result)."""
        row = self.find(query, **params)
        assert row is not None, f"{query} returns a row"
        return row

    def executemany(self, query: str, rows: list[dict[str, Any]]) -> None:
        with closing(self._conn.cursor()) as cur:
            cur.executemany(self._queries[query], rows)

    def event(
        self,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one row to mesh_task_events (the mesh store's own append_event)."""
        store = self._store
        self._conn.execute(
            store._mesh["append_event"],
            {
                "task_id": task_id,
                "event": event,
                "machine_id": machine_id,
                "now": store._time(now),
                "detail": store._json(detail or {}),
            },
        )


class SqlMeshStore(SqlValues):
    """MeshStore logic over a backend's primitives (the `# Backend` methods below, and
    SqlValues' timestamps and JSON)."""

    _mesh: Mapping[str, str]  # the backend's named mesh queries
    _query: Callable[..., list[Row]]  # `_query(sql, params)`: the rows of one statement

    # Backend ---------------------------------------------------------------------
    def _write(self, work: Callable[[Tx], T], queries: Mapping[str, str] | None = None) -> T:
        """`work(tx)` in one write transaction, over `queries` (default: the mesh's)."""
        raise NotImplementedError

    def _read_together(self, *queries: str) -> list[list[Row]]:
        """The rows of each of `queries` (parameterless)."""
        return [self._read(q) for q in queries]

    def _put(self, query: str, /, **params: Any) -> None:
        """One statement that writes the same rows if repeated (an upsert)."""
        self._write(lambda tx: tx.execute(query, **params))

    def _requeue_left(self, tx: Tx, machine_id: str, now: datetime) -> int:
        """Requeue a leaving machine's active claims (not failures); how many."""
        raise NotImplementedError

    def _requeue_down(
        self, tx: Tx, machine_id: str, now: datetime, max_attempts: int
    ) -> tuple[int, int]:
        """Requeue a down machine's active claims as failed attempts; (requeued, dead)."""
        raise NotImplementedError

    def _enqueue(self, params: dict[str, Any], now: datetime) -> None:
        """Insert the task of `params` unless its id is there, with its `queued` event."""
        raise NotImplementedError

    def _fenced(self, query: str, now: datetime, params: Params, queries: Queries) -> bool:
        """An agent's write, conditional on its claim (see MeshStore.transition), with the
        event it records; False when refused. `params` carry task_id, machine_id, claim."""
        raise NotImplementedError

    # Rows --------------------------------------------------------------------------
    def _read(self, query: str, /, **params: Any) -> list[Row]:
        return self._query(self._mesh[query], params)

    def _task_of(self, row: Row) -> QueuedTask:
        col_time = self._col_time
        return QueuedTask(
            task_id=row["task_id"],
            kind=row["kind"],
            command=self._col_json(row["command"]),
            target=row["target"],
            model=row["model"],
            status=TaskStatus(row["status"]),
            attempts=row["attempts"],
            claim_seq=row["claim_seq"],
            claimed_by=row["claimed_by"],
            pane_id=row["pane_id"],
            created_at=col_time(row["created_at"]),
            claimed_at=col_time(row["claimed_at"]),
            progress_at=col_time(row["progress_at"]),
            finished_at=col_time(row["finished_at"]),
            output=row["output"],
            error=row["error"],
            checkpoint=row["checkpoint"],
            task_type=row["task_type"],
            mesh_id=row["mesh_id"],
            generation=row["generation"],
        )

    def _machine_of(self, row: Row) -> MachineHealth:
        return MachineHealth(
            machine_id=row["machine_id"],
            mesh_id=row["mesh_id"],
            role=row["role"],
            generation=row["generation"],
            last_heartbeat=self._col_time(row["last_heartbeat"]),
            health_url=row["health_url"],
            active_tasks=self._col_json(row["active_tasks"]) or [],
            status=row["status"],
            failed_confirmations=row["failed_confirmations"],
        )

    # Machines --------------------------------------------------------------------
    def heartbeat(
        self,
        identity: MachineIdentity,
        now: datetime,
        health_url: str | None,
        active_tasks: list[str],
    ) -> None:
        def work(tx: Tx) -> None:
            prev = tx.find("lock_machine", machine_id=identity.machine_id)
            tx.execute(
                "heartbeat",
                machine_id=identity.machine_id,
                mesh_id=identity.mesh_id,
                role=identity.role,
                generation=identity.generation,
                now=self._time(now),
                health_url=health_url,
                active_tasks=self._json(list(active_tasks)),
            )
            if prev is not None and prev["status"] in rules.GONE_MACHINE_STATUSES:
                tx.event(
                    None, "MachineUp", identity.machine_id, now, {"previous_status": prev["status"]}
                )

        self._write(work)

    def leave(self, machine_id: str, now: datetime) -> int:
        def work(tx: Tx) -> int:
            tx.execute("mark_left", machine_id=machine_id, now=self._time(now))
            moved = self._requeue_left(tx, machine_id, now)
            tx.event(None, "MachineLeft", machine_id, now, {"requeued": moved})
            return moved

        return self._write(work)

    def machines(self) -> list[MachineHealth]:
        return [self._machine_of(r) for r in self._read("machines")]

    def record_confirmation(
        self, machine_id: str, failed: bool, now: datetime, *, stale_before: datetime | None = None
    ) -> MachineHealth:
        def work(tx: Tx) -> MachineHealth:
            row = tx.find("lock_machine", machine_id=machine_id)
            if row is None:
                raise unknown_machine(machine_id)
            status, count = rules.confirmation_update(
                row["status"],
                row["failed_confirmations"],
                self._col_time(row["last_heartbeat"]),
                failed,
                utc(stale_before) if stale_before else None,
            )
            if (status, count) != (row["status"], row["failed_confirmations"]):
                row = tx.one(
                    "set_machine_status",
                    machine_id=machine_id,
                    status=status,
                    failed_confirmations=count,
                    now=self._time(now),
                )
            return self._machine_of(row)

        return self._write(work)

    def mark_down(
        self,
        machine_id: str,
        now: datetime,
        *,
        stale_before: datetime | None = None,
        max_attempts: int | None = None,
    ) -> int:
        limit = default_max_attempts() if max_attempts is None else max_attempts

        def work(tx: Tx) -> int:
            row = tx.find("lock_machine", machine_id=machine_id)
            if row is None:
                raise unknown_machine(machine_id)
            last = self._col_time(row["last_heartbeat"])
            if stale_before is not None and last >= utc(stale_before):
                return -1  # it heartbeated while we were confirming: not down
            tx.execute("mark_down", machine_id=machine_id, now=self._time(now))
            requeued, dead = self._requeue_down(tx, machine_id, now, limit)
            detail = {"requeued": requeued, "dead_lettered": dead}
            tx.event(None, "MachineDown", machine_id, now, detail)
            return requeued + dead

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
        self._enqueue(
            {
                "task_id": task_id,
                "kind": kind,
                "command": self._json(list(command)),
                "target": target,
                "model": model,
                "now": self._time(now),
                "task_type": task_type(kind, command),
                "mesh_id": mesh_id or None,
                "generation": generation,
            },
            now,
        )
        return task_id

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
        finished = status in (TaskStatus.DONE, TaskStatus.FAILED)
        claim = fence(task_id, machine_id, claim_seq)
        return self._fenced(
            "transition",
            now,
            claim
            | {
                "status": status.value,
                "pane_id": pane_id,
                "output": output,
                "error": error,
                "finished": finished,
                "finished_at": self._time(now) if finished else None,
            },
            self._mesh,
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
        claim = fence(task_id, machine_id, claim_seq)
        return self._fenced("progress", now, claim | {"note": note}, self._mesh)

    def handoff(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        checkpoint: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        claim = fence(task_id, machine_id, claim_seq)
        return self._fenced("handoff", now, claim | {"checkpoint": checkpoint}, self._mesh)

    def get_task(self, task_id: str) -> QueuedTask | None:
        rows = self._read("get_task", task_id=task_id)
        return self._task_of(rows[0]) if rows else None

    def tasks_of(self, machine_id: str) -> list[QueuedTask]:
        return [self._task_of(r) for r in self._read("tasks_of", machine_id=machine_id)]

    def events(self, task_id: str | None = None, *, event: str | None = None) -> list[TaskEvent]:
        return [
            TaskEvent(
                task_id=r["task_id"],
                event=r["event"],
                machine_id=r["machine_id"],
                at=self._col_time(r["at"]),
                detail=self._col_json(r["detail"]) or {},
            )
            for r in self._read("events", task_id=task_id, event=event)
        ]

    def queue_stats(self, now: datetime) -> dict[str, Any]:
        rows, oldest = self._read_together("queue_depth", "oldest_queued")
        depth = {s.value: 0 for s in TaskStatus} | {r["status"]: r["n"] for r in rows}
        oldest_at = self._col_time(oldest[0]["t"]) if oldest else None
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
        limits = rules.Thresholds(orphan_seconds, stuck_seconds, expiry_seconds, max_attempts)
        return self._reconcile(now, limits, dict(by_machine or {}))

    def _reconcile(
        self, now: datetime, limits: rules.Thresholds, by_machine: dict[str, rules.Thresholds]
    ) -> ReconcileCounts:
        """One reconcile cycle (rules.py) in one transaction, with its ReconcilerRun event;
        the claims of the machines in `by_machine` (a canary policy's) are judged by their own
        orphan and stuck thresholds."""
        raise NotImplementedError

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
        self._put(
            "set_pane_state",
            machine_id=machine_id,
            pane_id=pane_id,
            task_id=task_id,
            claim=claim_seq,
            alive=alive,
            context_ratio=context_ratio,
            now=self._time(now),
        )

    def pane_states(self, machine_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "machine_id": r["machine_id"],
                "pane_id": r["pane_id"],
                "task_id": r["task_id"],
                "claim_seq": r["claim_seq"],
                "alive": bool(r["alive"]),
                "context_ratio": r["context_ratio"],
                "updated_at": self._col_time(r["updated_at"]),
            }
            for r in self._read("pane_states", machine_id=machine_id)
        ]

    # Heartbeat history (0008_heartbeat_log.sql and its SQLite twin) ----------------
    def heartbeat_log(self, since: datetime, until: datetime) -> dict[str, list[datetime]]:
        """Every heartbeat logged in [since, until], per machine, oldest first (the log keeps
        8 days)."""
        beats: dict[str, list[datetime]] = {}
        for r in self._read("heartbeat_log", since=self._time(since), until=self._time(until)):
            beats.setdefault(r["machine_id"], []).append(self._col_time(r["at"]))
        return beats
