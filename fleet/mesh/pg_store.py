"""PostgreSQL backend of the MeshStore: claim and reconcile are the SQL functions of 0002_mesh.sql."""

from __future__ import annotations

import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from fleet.errors import StoreUnavailable
from fleet.mesh import rules
from fleet.mesh.immune import task_type
from fleet.mesh.immune_store import PgImmuneOps
from fleet.mesh.store import (
    PROTOCOL_GENERATION, MachineHealth, MachineIdentity, QueuedTask, ReconcileCounts, TaskEvent,
    TaskStatus,
)

_ACTIVE = "('claimed', 'injected', 'running')"
# An agent's write names the claim it holds (fencing); NULL = any claim of this machine.
_THIS_CLAIM = "(%(claim)s::integer IS NULL OR claim_seq = %(claim)s)"
AGENT_TARGET_STATUSES = frozenset(
    {TaskStatus.INJECTED, TaskStatus.RUNNING, TaskStatus.DONE, TaskStatus.FAILED}
)


def _default_max_attempts() -> int:
    from fleet.settings import get_settings

    return get_settings().max_task_attempts


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _task(row: dict[str, Any]) -> QueuedTask:
    return QueuedTask(**{**row, "status": TaskStatus(row["status"])})


def _machine(row: dict[str, Any]) -> MachineHealth:
    return MachineHealth(
        machine_id=row["machine_id"], mesh_id=row["mesh_id"], role=row["role"],
        generation=row["generation"], last_heartbeat=row["last_heartbeat"],
        health_url=row["health_url"], active_tasks=row["active_tasks"] or [],
        status=row["status"], failed_confirmations=row["failed_confirmations"],
    )


class PgMeshStore(PgImmuneOps):
    """MeshStore on PostgreSQL (or Supabase's database) through one psycopg connection.

    The connection is opened lazily and reopened after a failure; every error surfaces as
    StoreUnavailable. Statement and lock timeouts bound every call, so a held lock or a
    hung server is an error the caller sees, never a hang.
    """

    def __init__(self, conninfo: str, *, connect_timeout_seconds: float = 5,
                 statement_timeout_seconds: float = 30, lock_timeout_seconds: float = 10):
        import psycopg.conninfo

        self._conninfo = conninfo
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
        # Shown in reprs and errors: never the password.
        self._where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
        self._connect_timeout = max(1, int(connect_timeout_seconds))
        self._statement_ms = int(statement_timeout_seconds * 1000)
        self._lock_ms = int(lock_timeout_seconds * 1000)
        self._conn = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"PgMeshStore({self._where!r})"

    def _connection(self):
        import psycopg
        from psycopg.rows import dict_row

        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=self._connect_timeout,
                row_factory=dict_row,
            )
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute(f"SET statement_timeout = {self._statement_ms}")
            conn.execute(f"SET lock_timeout = {self._lock_ms}")
            self._conn = conn
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        import psycopg

        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                raise StoreUnavailable(
                    f"PostgreSQL mesh store {self._where}: {type(exc).__name__}: {exc}".strip()
                    + " — check the server is up and 0002_mesh.sql is applied"
                ) from exc

    def _query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._tx() as conn:
            return conn.execute(sql, params).fetchall()

    @staticmethod
    def _event(conn, task_id: str | None, event: str, machine_id: str | None, now: datetime,
               detail: dict[str, Any] | None = None) -> None:
        from psycopg.types.json import Jsonb

        conn.execute(
            "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
            "VALUES (%s, %s, %s, %s, %s)",
            (task_id, event, machine_id, _utc(now), Jsonb(detail or {})),
        )

    # Machines --------------------------------------------------------------------
    def heartbeat(self, identity: MachineIdentity, now: datetime, health_url: str | None,
                  active_tasks: list[str]) -> None:
        from psycopg.types.json import Jsonb

        with self._tx() as conn:
            prev = conn.execute(
                "SELECT status FROM mesh_health WHERE machine_id = %s FOR UPDATE",
                (identity.machine_id,),
            ).fetchone()
            conn.execute(
                "INSERT INTO mesh_health AS h (machine_id, mesh_id, role, generation, last_heartbeat, "
                "health_url, active_tasks, status, failed_confirmations, status_changed_at, updated_at) "
                "VALUES (%(id)s, %(mesh)s, %(role)s, %(gen)s, %(now)s, %(url)s, %(tasks)s, 'alive', 0, "
                "%(now)s, %(now)s) "
                "ON CONFLICT (machine_id) DO UPDATE SET mesh_id = excluded.mesh_id, "
                "role = excluded.role, generation = excluded.generation, "
                # A heartbeat delivered late never moves the clock back.
                "last_heartbeat = greatest(h.last_heartbeat, excluded.last_heartbeat), "
                "health_url = excluded.health_url, active_tasks = excluded.active_tasks, "
                "status_changed_at = CASE WHEN h.status <> 'alive' THEN excluded.updated_at "
                "  ELSE h.status_changed_at END, "
                "status = 'alive', failed_confirmations = 0, updated_at = excluded.updated_at",
                {"id": identity.machine_id, "mesh": identity.mesh_id, "role": identity.role,
                 "gen": identity.generation, "now": _utc(now), "url": health_url,
                 "tasks": Jsonb(list(active_tasks))},
            )
            if prev is not None and prev["status"] in rules.GONE_MACHINE_STATUSES:
                self._event(conn, None, "MachineUp", identity.machine_id, now,
                            {"previous_status": prev["status"]})

    def leave(self, machine_id: str, now: datetime) -> int:
        with self._tx() as conn:
            conn.execute(
                "UPDATE mesh_health SET status = 'left', status_changed_at = %s, updated_at = %s "
                "WHERE machine_id = %s",
                (_utc(now), _utc(now), machine_id),
            )
            moved = conn.execute(
                "WITH cand AS (SELECT task_id, claimed_by FROM mesh_task_queue "
                f"  WHERE claimed_by = %(m)s AND status IN {_ACTIVE} FOR UPDATE), "
                "moved AS (UPDATE mesh_task_queue q SET status = 'queued', claimed_by = NULL, "
                "  claimed_at = NULL, progress_at = NULL, pane_id = NULL FROM cand "
                "  WHERE q.task_id = cand.task_id RETURNING q.task_id, q.attempts, cand.claimed_by), "
                "logged AS (INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "  SELECT task_id, 'queued', claimed_by, %(now)s, "
                "  jsonb_build_object('reason', 'machine_left', 'attempts', attempts) FROM moved) "
                "SELECT count(*) AS n FROM moved",
                {"m": machine_id, "now": _utc(now)},
            ).fetchone()["n"]
            self._event(conn, None, "MachineLeft", machine_id, now, {"requeued": moved})
        return moved

    def machines(self) -> list[MachineHealth]:
        return [_machine(r) for r in self._query("SELECT * FROM mesh_health ORDER BY machine_id")]

    def record_confirmation(self, machine_id: str, failed: bool, now: datetime, *,
                            stale_before: datetime | None = None) -> MachineHealth:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM mesh_health WHERE machine_id = %s FOR UPDATE", (machine_id,)
            ).fetchone()
            if row is None:
                raise LookupError(f"no heartbeat was ever recorded for machine {machine_id!r}")
            status, count = rules.confirmation_update(
                row["status"], row["failed_confirmations"], row["last_heartbeat"], failed,
                _utc(stale_before) if stale_before else None,
            )
            if (status, count) != (row["status"], row["failed_confirmations"]):
                row = conn.execute(
                    "UPDATE mesh_health SET status = %(s)s, failed_confirmations = %(n)s, "
                    "updated_at = %(now)s, status_changed_at = CASE WHEN status <> %(s)s "
                    "THEN %(now)s ELSE status_changed_at END WHERE machine_id = %(m)s RETURNING *",
                    {"s": status, "n": count, "now": _utc(now), "m": machine_id},
                ).fetchone()
        return _machine(row)

    def mark_down(self, machine_id: str, now: datetime, *, stale_before: datetime | None = None,
                  max_attempts: int | None = None) -> int:
        max_attempts = _default_max_attempts() if max_attempts is None else max_attempts
        with self._tx() as conn:
            row = conn.execute(
                "SELECT status, last_heartbeat FROM mesh_health WHERE machine_id = %s FOR UPDATE",
                (machine_id,),
            ).fetchone()
            if row is None:
                raise LookupError(f"no heartbeat was ever recorded for machine {machine_id!r}")
            if stale_before is not None and row["last_heartbeat"] >= _utc(stale_before):
                return -1  # it heartbeated while we were confirming: not down
            conn.execute(
                "UPDATE mesh_health SET status = 'down', updated_at = %(now)s, "
                "status_changed_at = CASE WHEN status <> 'down' THEN %(now)s ELSE status_changed_at END "
                "WHERE machine_id = %(m)s",
                {"now": _utc(now), "m": machine_id},
            )
            # Rows another session holds right now are left to the reconciler's down-machine rule.
            moved = conn.execute(
                "SELECT * FROM mesh_requeue_failed(ARRAY(SELECT task_id FROM mesh_task_queue "
                f"WHERE claimed_by = %(m)s AND status IN {_ACTIVE} FOR UPDATE SKIP LOCKED), "
                "%(now)s, %(max)s, 'machine_down')",
                {"m": machine_id, "now": _utc(now), "max": max_attempts},
            ).fetchone()
            self._event(conn, None, "MachineDown", machine_id, now, dict(moved))
        return moved["requeued"] + moved["dead_lettered"]

    # Queue -----------------------------------------------------------------------
    def enqueue(self, kind: str, command: list[str], now: datetime, target: str | None = None,
                model: str | None = None, task_id: str | None = None, *,
                mesh_id: str | None = None, generation: int | None = None) -> str:
        from psycopg.types.json import Jsonb

        task_id = task_id or uuid.uuid4().hex
        if mesh_id and generation is None:
            generation = PROTOCOL_GENERATION
        with self._tx() as conn:
            conn.execute(
                "WITH added AS (INSERT INTO mesh_task_queue (task_id, kind, command, target, model, "
                "  status, created_at, task_type, mesh_id, generation) VALUES (%(id)s, %(kind)s, "
                "  %(cmd)s, %(target)s, %(model)s, 'queued', %(now)s, %(type)s, %(mesh)s, %(gen)s) "
                "  ON CONFLICT (task_id) DO NOTHING RETURNING task_id) "
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "SELECT task_id, 'queued', NULL, %(now)s, "
                "  jsonb_build_object('kind', %(kind)s::text, 'target', %(target)s::text) FROM added",
                {"id": task_id, "kind": kind, "cmd": Jsonb(list(command)), "target": target,
                 "model": model, "now": _utc(now), "type": task_type(kind, command),
                 "mesh": mesh_id or None, "gen": generation},
            )
        return task_id

    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        rows = self._query("SELECT * FROM mesh_claim(%s, %s, %s)", (machine_id, _utc(now), limit))
        return [_task(r) for r in rows]

    def transition(self, task_id: str, machine_id: str, status: TaskStatus, now: datetime,
                   *, pane_id: str | None = None, output: str | None = None,
                   error: str | None = None, claim_seq: int | None = None) -> bool:
        status = TaskStatus(status)
        if status not in AGENT_TARGET_STATUSES:
            raise ValueError(
                f"an agent moves a task to injected, running, done or failed, not {status.value!r}; "
                "use handoff() to requeue"
            )
        finished = status in (TaskStatus.DONE, TaskStatus.FAILED)
        with self._tx() as conn:
            row = conn.execute(
                "WITH moved AS (UPDATE mesh_task_queue SET status = %(s)s, progress_at = %(now)s, "
                "  pane_id = COALESCE(%(pane)s, pane_id), output = COALESCE(%(out)s, output), "
                "  error = COALESCE(%(err)s, error), "
                "  finished_at = CASE WHEN %(fin)s THEN %(now)s ELSE finished_at END "
                f"  WHERE task_id = %(id)s AND claimed_by = %(m)s AND status IN {_ACTIVE} "
                f"  AND {_THIS_CLAIM} RETURNING task_id, pane_id), "
                "logged AS (INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "  SELECT task_id, %(s)s, %(m)s, %(now)s, jsonb_strip_nulls(jsonb_build_object("
                "    'pane_id', pane_id, 'error', left(%(err)s::text, 500))) FROM moved) "
                "SELECT count(*) AS n FROM moved",
                {"s": status.value, "now": _utc(now), "pane": pane_id, "out": output,
                 "err": error, "fin": finished, "id": task_id, "m": machine_id, "claim": claim_seq},
            ).fetchone()
        return row["n"] == 1

    def progress(self, task_id: str, machine_id: str, now: datetime, note: str | None = None,
                 *, claim_seq: int | None = None) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                "WITH moved AS (UPDATE mesh_task_queue SET progress_at = %(now)s "
                f"  WHERE task_id = %(id)s AND claimed_by = %(m)s AND status IN {_ACTIVE} "
                f"  AND {_THIS_CLAIM} RETURNING task_id), "
                "logged AS (INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "  SELECT task_id, 'Progress', %(m)s, %(now)s, "
                "  jsonb_build_object('note', left(%(note)s::text, 2000)) "
                "  FROM moved WHERE %(note)s::text IS NOT NULL) "
                "SELECT count(*) AS n FROM moved",
                {"now": _utc(now), "id": task_id, "m": machine_id, "note": note, "claim": claim_seq},
            ).fetchone()
        return row["n"] == 1

    def handoff(self, task_id: str, machine_id: str, now: datetime, checkpoint: str,
                *, claim_seq: int | None = None) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                "WITH moved AS (UPDATE mesh_task_queue SET status = 'queued', checkpoint = %(cp)s, "
                "  claimed_by = NULL, claimed_at = NULL, progress_at = NULL, pane_id = NULL "
                f"  WHERE task_id = %(id)s AND claimed_by = %(m)s AND status IN {_ACTIVE} "
                f"  AND {_THIS_CLAIM} RETURNING task_id, attempts), "
                "logged AS (INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "  SELECT task_id, 'Handoff', %(m)s, %(now)s, jsonb_build_object('status', 'queued', "
                "  'attempts', attempts, 'checkpoint_chars', length(%(cp)s::text)) FROM moved) "
                "SELECT count(*) AS n FROM moved",
                {"cp": checkpoint, "id": task_id, "m": machine_id, "now": _utc(now),
                 "claim": claim_seq},
            ).fetchone()
        return row["n"] == 1

    def get_task(self, task_id: str) -> QueuedTask | None:
        rows = self._query("SELECT * FROM mesh_task_queue WHERE task_id = %s", (task_id,))
        return _task(rows[0]) if rows else None

    def tasks_of(self, machine_id: str) -> list[QueuedTask]:
        rows = self._query(
            f"SELECT * FROM mesh_task_queue WHERE claimed_by = %s AND status IN {_ACTIVE} "
            "ORDER BY claimed_at, task_id",
            (machine_id,),
        )
        return [_task(r) for r in rows]

    def events(self, task_id: str | None = None, *, event: str | None = None) -> list[TaskEvent]:
        rows = self._query(
            "SELECT * FROM mesh_task_events WHERE (%(t)s::text IS NULL OR task_id = %(t)s) "
            "AND (%(e)s::text IS NULL OR event = %(e)s) ORDER BY id",
            {"t": task_id, "e": event},
        )
        return [
            TaskEvent(task_id=r["task_id"], event=r["event"], machine_id=r["machine_id"],
                      at=r["at"], detail=r["detail"] or {})
            for r in rows
        ]

    def queue_stats(self, now: datetime) -> dict[str, Any]:
        depth = {s.value: 0 for s in TaskStatus}
        with self._tx() as conn:
            for r in conn.execute("SELECT status, count(*) AS n FROM mesh_task_queue GROUP BY status"):
                depth[r["status"]] = r["n"]
            oldest_at = conn.execute(
                "SELECT min(created_at) AS t FROM mesh_task_queue WHERE status = 'queued'"
            ).fetchone()["t"]
        return {
            "depth": depth,
            "oldest_queued_age_seconds": (_utc(now) - oldest_at).total_seconds() if oldest_at else None,
            "dead_letter": depth[TaskStatus.DEAD_LETTER.value],
        }

    # Reconciler -------------------------------------------------------------------
    def reconcile(self, now: datetime, *, orphan_seconds: float, stuck_seconds: float,
                  expiry_seconds: float, max_attempts: int) -> ReconcileCounts:
        row = self._query(
            "SELECT * FROM mesh_reconcile(%s, %s, %s, %s, %s)",
            (_utc(now), orphan_seconds, stuck_seconds, expiry_seconds, max_attempts),
        )[0]
        return ReconcileCounts(**row)

    # Panes ------------------------------------------------------------------------
    def set_pane_state(self, machine_id: str, pane_id: str, now: datetime, *, task_id: str | None,
                       alive: bool, context_ratio: float | None = None,
                       claim_seq: int | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO mesh_pane_state (machine_id, pane_id, task_id, claim_seq, alive, "
                "context_ratio, updated_at) VALUES (%(m)s, %(p)s, %(t)s, COALESCE(%(claim)s::integer, "
                "(SELECT claim_seq FROM mesh_task_queue WHERE task_id = %(t)s AND claimed_by = %(m)s "
                f"AND status IN {_ACTIVE})), %(alive)s, %(ratio)s, %(now)s) "
                "ON CONFLICT (machine_id, pane_id) DO UPDATE SET "
                "task_id = excluded.task_id, claim_seq = excluded.claim_seq, alive = excluded.alive, "
                "context_ratio = excluded.context_ratio, updated_at = excluded.updated_at",
                {"m": machine_id, "p": pane_id, "t": task_id, "claim": claim_seq, "alive": alive,
                 "ratio": context_ratio, "now": _utc(now)},
            )

    def pane_states(self, machine_id: str | None = None) -> list[dict[str, Any]]:
        return self._query(
            "SELECT machine_id, pane_id, task_id, claim_seq, alive, context_ratio, updated_at "
            "FROM mesh_pane_state WHERE (%(m)s::text IS NULL OR machine_id = %(m)s) "
            "ORDER BY machine_id, pane_id",
            {"m": machine_id},
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
