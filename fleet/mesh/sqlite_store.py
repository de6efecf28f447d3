"""SQLite backend of the MeshStore: the embedded default, one file shared by threads and processes."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from fleet.mesh import rules
from fleet.mesh.immune import task_type
from fleet.mesh.immune_store import SQLiteImmuneOps
from fleet.sqlitedb import SQLiteFile
from fleet.mesh.store import (
    PROTOCOL_GENERATION, MachineHealth, MachineIdentity, QueuedTask, ReconcileCounts, TaskEvent,
    TaskStatus,
)

_SCHEMA = resources.files("fleet.mesh").joinpath("mesh_schema_sqlite.sql").read_text()
# Columns added after the first schema: (table, column, definition), added to older files on open.
_ADDED_COLUMNS = (
    ("mesh_task_queue", "claim_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("mesh_pane_state", "claim_seq", "INTEGER"),
    ("mesh_task_queue", "mesh_id", "TEXT"),
    ("mesh_task_queue", "generation", "INTEGER"),
    ("mesh_task_queue", "task_type", "TEXT"),
)
_ACTIVE = "('claimed', 'injected', 'running')"
_UNFINISHED = "('queued', 'claimed', 'injected', 'running')"
# An agent's write names the claim it holds (fencing); None = any claim of this machine.
_THIS_CLAIM = "(? IS NULL OR claim_seq = ?)"
AGENT_TARGET_STATUSES = frozenset(
    {TaskStatus.INJECTED, TaskStatus.RUNNING, TaskStatus.DONE, TaskStatus.FAILED}
)


def _utc(value: datetime | None) -> datetime | None:
    """Naive datetimes are UTC, as PostgreSQL's timestamptz (session zone UTC) takes them."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _ts(value: datetime | None) -> str | None:
    # Fixed width (microseconds always written) so strings compare in time order in SQL.
    if value is None:
        return None
    return _utc(value).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _task(row: sqlite3.Row) -> QueuedTask:
    return QueuedTask(
        task_id=row["task_id"], kind=row["kind"], command=json.loads(row["command"]),
        target=row["target"], model=row["model"], status=TaskStatus(row["status"]),
        attempts=row["attempts"], claim_seq=row["claim_seq"], claimed_by=row["claimed_by"],
        pane_id=row["pane_id"],
        created_at=_dt(row["created_at"]), claimed_at=_dt(row["claimed_at"]),
        progress_at=_dt(row["progress_at"]), finished_at=_dt(row["finished_at"]),
        output=row["output"], error=row["error"], checkpoint=row["checkpoint"],
        task_type=row["task_type"], mesh_id=row["mesh_id"], generation=row["generation"],
    )


def _machine(row: sqlite3.Row) -> MachineHealth:
    return MachineHealth(
        machine_id=row["machine_id"], mesh_id=row["mesh_id"], role=row["role"],
        generation=row["generation"], last_heartbeat=_dt(row["last_heartbeat"]),
        health_url=row["health_url"], active_tasks=json.loads(row["active_tasks"]),
        status=row["status"], failed_confirmations=row["failed_confirmations"],
    )


def _default_max_attempts() -> int:
    from fleet.settings import get_settings

    return get_settings().max_task_attempts


class SQLiteMeshStore(SQLiteImmuneOps, SQLiteFile):
    """MeshStore on a SQLite file (WAL). Every write is one BEGIN IMMEDIATE transaction, so
    claims are atomic across connections; open one store per thread or process."""

    what = "SQLite mesh store"

    def __init__(self, path: str | Path, *, busy_timeout_seconds: float = 30):
        super().__init__(path, _SCHEMA, busy_timeout_seconds=busy_timeout_seconds)
        with self._tx() as db:
            for table, column, definition in _ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    @staticmethod
    def _event(db: sqlite3.Connection, task_id: str | None, event: str, machine_id: str | None,
               now: datetime, detail: dict[str, Any] | None = None) -> None:
        db.execute(
            "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) VALUES (?, ?, ?, ?, ?)",
            (task_id, event, machine_id, _ts(now), json.dumps(detail or {})),
        )

    # Machines --------------------------------------------------------------------
    def heartbeat(self, identity: MachineIdentity, now: datetime, health_url: str | None,
                  active_tasks: list[str]) -> None:
        with self._tx() as db:
            prev = db.execute(
                "SELECT status FROM mesh_health WHERE machine_id = ?", (identity.machine_id,)
            ).fetchone()
            db.execute(
                "INSERT INTO mesh_health (machine_id, mesh_id, role, generation, last_heartbeat, "
                "health_url, active_tasks, status, failed_confirmations, status_changed_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'alive', 0, ?, ?) "
                "ON CONFLICT (machine_id) DO UPDATE SET mesh_id = excluded.mesh_id, "
                "role = excluded.role, generation = excluded.generation, "
                # A heartbeat delivered late never moves the clock back.
                "last_heartbeat = max(mesh_health.last_heartbeat, excluded.last_heartbeat), "
                "health_url = excluded.health_url, active_tasks = excluded.active_tasks, "
                "status_changed_at = CASE WHEN mesh_health.status <> 'alive' "
                "  THEN excluded.updated_at ELSE mesh_health.status_changed_at END, "
                "status = 'alive', failed_confirmations = 0, updated_at = excluded.updated_at",
                (identity.machine_id, identity.mesh_id, identity.role, identity.generation,
                 _ts(now), health_url, json.dumps(list(active_tasks)), _ts(now), _ts(now)),
            )
            if prev is not None and prev["status"] in rules.GONE_MACHINE_STATUSES:
                self._event(db, None, "MachineUp", identity.machine_id, now,
                            {"previous_status": prev["status"]})

    def leave(self, machine_id: str, now: datetime) -> int:
        with self._tx() as db:
            db.execute(
                "UPDATE mesh_health SET status = 'left', status_changed_at = ?, updated_at = ? "
                "WHERE machine_id = ?",
                (_ts(now), _ts(now), machine_id),
            )
            pred = f"claimed_by = ? AND status IN {_ACTIVE}"
            db.execute(
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                f"SELECT task_id, 'queued', claimed_by, ?, json_object('reason', 'machine_left', "
                f"'attempts', attempts) FROM mesh_task_queue WHERE {pred}",
                (_ts(now), machine_id),
            )
            moved = db.execute(
                "UPDATE mesh_task_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL, "
                f"progress_at = NULL, pane_id = NULL WHERE {pred} RETURNING task_id",
                (machine_id,),
            ).fetchall()
            self._event(db, None, "MachineLeft", machine_id, now, {"requeued": len(moved)})
        return len(moved)

    def machines(self) -> list[MachineHealth]:
        return [_machine(r) for r in self._query("SELECT * FROM mesh_health ORDER BY machine_id")]

    def record_confirmation(self, machine_id: str, failed: bool, now: datetime, *,
                            stale_before: datetime | None = None) -> MachineHealth:
        with self._tx() as db:
            row = db.execute("SELECT * FROM mesh_health WHERE machine_id = ?", (machine_id,)).fetchone()
            if row is None:
                raise LookupError(f"no heartbeat was ever recorded for machine {machine_id!r}")
            status, count = rules.confirmation_update(
                row["status"], row["failed_confirmations"], _dt(row["last_heartbeat"]),
                failed, _utc(stale_before),
            )
            if (status, count) != (row["status"], row["failed_confirmations"]):
                row = db.execute(
                    "UPDATE mesh_health SET status = ?, failed_confirmations = ?, updated_at = ?, "
                    "status_changed_at = CASE WHEN status <> ? THEN ? ELSE status_changed_at END "
                    "WHERE machine_id = ? RETURNING *",
                    (status, count, _ts(now), status, _ts(now), machine_id),
                ).fetchone()
        return _machine(row)

    def mark_down(self, machine_id: str, now: datetime, *, stale_before: datetime | None = None,
                  max_attempts: int | None = None) -> int:
        max_attempts = _default_max_attempts() if max_attempts is None else max_attempts
        with self._tx() as db:
            row = db.execute(
                "SELECT status, last_heartbeat FROM mesh_health WHERE machine_id = ?", (machine_id,)
            ).fetchone()
            if row is None:
                raise LookupError(f"no heartbeat was ever recorded for machine {machine_id!r}")
            if stale_before is not None and _dt(row["last_heartbeat"]) >= _utc(stale_before):
                return -1  # it heartbeated while we were confirming: not down
            db.execute(
                "UPDATE mesh_health SET status = 'down', updated_at = ?, "
                "status_changed_at = CASE WHEN status <> 'down' THEN ? ELSE status_changed_at END "
                "WHERE machine_id = ?",
                (_ts(now), _ts(now), machine_id),
            )
            requeued, dead = self._requeue_failed(
                db, f"claimed_by = ? AND status IN {_ACTIVE}", (machine_id,), now, max_attempts,
                "machine_down",
            )
            self._event(db, None, "MachineDown", machine_id, now,
                        {"requeued": requeued, "dead_lettered": dead})
        return requeued + dead

    # Queue -----------------------------------------------------------------------
    def enqueue(self, kind: str, command: list[str], now: datetime, target: str | None = None,
                model: str | None = None, task_id: str | None = None, *,
                mesh_id: str | None = None, generation: int | None = None) -> str:
        task_id = task_id or uuid.uuid4().hex
        if mesh_id and generation is None:
            generation = PROTOCOL_GENERATION
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO mesh_task_queue (task_id, kind, command, target, model, status, created_at, "
                "task_type, mesh_id, generation) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?) "
                "ON CONFLICT (task_id) DO NOTHING RETURNING task_id",
                (task_id, kind, json.dumps(list(command)), target, model, _ts(now),
                 task_type(kind, command), mesh_id or None, generation),
            ).fetchone()
            if row is not None:
                self._event(db, task_id, "queued", None, now, {"kind": kind, "target": target})
        return task_id

    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        return self.immune_claim(machine_id, now, limit)

    def transition(self, task_id: str, machine_id: str, status: TaskStatus, now: datetime,
                   *, pane_id: str | None = None, output: str | None = None,
                   error: str | None = None, claim_seq: int | None = None) -> bool:
        status = TaskStatus(status)
        if status not in AGENT_TARGET_STATUSES:
            raise ValueError(
                f"an agent moves a task to injected, running, done or failed, not {status.value!r}; "
                "use handoff() to requeue"
            )
        finished = _ts(now) if status in (TaskStatus.DONE, TaskStatus.FAILED) else None
        with self._tx() as db:
            row = db.execute(
                "UPDATE mesh_task_queue SET status = ?, progress_at = ?, "
                "pane_id = COALESCE(?, pane_id), output = COALESCE(?, output), "
                "error = COALESCE(?, error), finished_at = COALESCE(?, finished_at) "
                f"WHERE task_id = ? AND claimed_by = ? AND status IN {_ACTIVE} AND {_THIS_CLAIM} "
                "RETURNING pane_id",
                (status.value, _ts(now), pane_id, output, error, finished, task_id, machine_id,
                 claim_seq, claim_seq),
            ).fetchone()
            if row is None:
                return False
            detail: dict[str, Any] = {"pane_id": row["pane_id"]}
            if error:
                detail["error"] = error[:500]
            self._event(db, task_id, status.value, machine_id, now, detail)
        return True

    def progress(self, task_id: str, machine_id: str, now: datetime, note: str | None = None,
                 *, claim_seq: int | None = None) -> bool:
        with self._tx() as db:
            row = db.execute(
                "UPDATE mesh_task_queue SET progress_at = ? "
                f"WHERE task_id = ? AND claimed_by = ? AND status IN {_ACTIVE} AND {_THIS_CLAIM} "
                "RETURNING task_id",
                (_ts(now), task_id, machine_id, claim_seq, claim_seq),
            ).fetchone()
            if row is None:
                return False
            if note is not None:
                self._event(db, task_id, "Progress", machine_id, now, {"note": note[:2000]})
        return True

    def handoff(self, task_id: str, machine_id: str, now: datetime, checkpoint: str,
                *, claim_seq: int | None = None) -> bool:
        with self._tx() as db:
            row = db.execute(
                "UPDATE mesh_task_queue SET status = 'queued', checkpoint = ?, claimed_by = NULL, "
                "claimed_at = NULL, progress_at = NULL, pane_id = NULL "
                f"WHERE task_id = ? AND claimed_by = ? AND status IN {_ACTIVE} AND {_THIS_CLAIM} "
                "RETURNING attempts",
                (checkpoint, task_id, machine_id, claim_seq, claim_seq),
            ).fetchone()
            if row is None:
                return False
            self._event(db, task_id, "Handoff", machine_id, now,
                        {"status": "queued", "attempts": row["attempts"],
                         "checkpoint_chars": len(checkpoint)})
        return True

    def get_task(self, task_id: str) -> QueuedTask | None:
        rows = self._query("SELECT * FROM mesh_task_queue WHERE task_id = ?", (task_id,))
        return _task(rows[0]) if rows else None

    def tasks_of(self, machine_id: str) -> list[QueuedTask]:
        rows = self._query(
            f"SELECT * FROM mesh_task_queue WHERE claimed_by = ? AND status IN {_ACTIVE} "
            "ORDER BY claimed_at, task_id",
            (machine_id,),
        )
        return [_task(r) for r in rows]

    def events(self, task_id: str | None = None, *, event: str | None = None) -> list[TaskEvent]:
        sql, params = "SELECT * FROM mesh_task_events WHERE 1 = 1", ()
        if task_id is not None:
            sql, params = sql + " AND task_id = ?", params + (task_id,)
        if event is not None:
            sql, params = sql + " AND event = ?", params + (event,)
        return [
            TaskEvent(task_id=r["task_id"], event=r["event"], machine_id=r["machine_id"],
                      at=_dt(r["at"]), detail=json.loads(r["detail"]))
            for r in self._query(sql + " ORDER BY id", params)
        ]

    def queue_stats(self, now: datetime) -> dict[str, Any]:
        depth = {s.value: 0 for s in TaskStatus}
        for r in self._query("SELECT status, COUNT(*) AS n FROM mesh_task_queue GROUP BY status"):
            depth[r["status"]] = r["n"]
        oldest = self._query("SELECT MIN(created_at) AS t FROM mesh_task_queue WHERE status = 'queued'")
        oldest_at = _dt(oldest[0]["t"]) if oldest else None
        return {
            "depth": depth,
            "oldest_queued_age_seconds": (_utc(now) - oldest_at).total_seconds() if oldest_at else None,
            "dead_letter": depth[TaskStatus.DEAD_LETTER.value],
        }

    # Reconciler -------------------------------------------------------------------
    @classmethod
    def _requeue_failed(cls, db: sqlite3.Connection, pred: str, params: tuple, now: datetime,
                        max_attempts: int, reason: str) -> tuple[int, int]:
        """Set-based requeue of the rows matching `pred` as one failed attempt each.

        Inside the write transaction nothing else changes the rows, so the events are
        logged from the same predicate first (SQLite's RETURNING cannot see old values).
        """
        db.execute(
            "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
            "SELECT task_id, CASE WHEN attempts + 1 > ? THEN 'dead_letter' ELSE 'queued' END, "
            "claimed_by, ?, json_object('reason', ?, 'attempts', attempts + 1) "
            f"FROM mesh_task_queue WHERE {pred}",
            (max_attempts, _ts(now), reason, *params),
        )
        rows = db.execute(
            "UPDATE mesh_task_queue SET attempts = attempts + 1, "
            "status = CASE WHEN attempts + 1 > ? THEN 'dead_letter' ELSE 'queued' END, "
            "finished_at = CASE WHEN attempts + 1 > ? THEN ? END, "
            "error = CASE WHEN attempts + 1 > ? THEN "
            "  'dead-lettered after ' || (attempts + 1) || ' failed attempts (last: ' || ? || ')' "
            "  ELSE error END, "
            "claimed_by = NULL, claimed_at = NULL, progress_at = NULL, pane_id = NULL "
            f"WHERE {pred} RETURNING status",
            (max_attempts, max_attempts, _ts(now), max_attempts, reason, *params),
        ).fetchall()
        dead = sum(1 for r in rows if r["status"] == TaskStatus.DEAD_LETTER.value)
        return len(rows) - dead, dead

    def reconcile(self, now: datetime, *, orphan_seconds: float, stuck_seconds: float,
                  expiry_seconds: float, max_attempts: int) -> ReconcileCounts:
        c = rules.cutoffs(now, rules.Thresholds(orphan_seconds, stuck_seconds, expiry_seconds,
                                                max_attempts))
        with self._tx() as db:
            expired_pred = f"status IN {_UNFINISHED} AND created_at < ?"
            db.execute(
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "SELECT task_id, 'expired', claimed_by, ?, json_object('reason', 'expired', "
                f"'attempts', attempts) FROM mesh_task_queue WHERE {expired_pred}",
                (_ts(now), _ts(c.expiry)),
            )
            expired = len(db.execute(
                "UPDATE mesh_task_queue SET status = 'expired', finished_at = ?, error = ? "
                f"WHERE {expired_pred} RETURNING task_id",
                (_ts(now), f"expired: not finished within {expiry_seconds:g} s of creation",
                 _ts(c.expiry)),
            ).fetchall())
            down_q, down_d = self._requeue_failed(
                db,
                f"status IN {_ACTIVE} AND claimed_by IN "
                "(SELECT machine_id FROM mesh_health WHERE status IN ('down', 'left'))",
                (), now, max_attempts, "machine_down",
            )
            orph_q, orph_d = self._requeue_failed(
                db,
                f"status IN {_ACTIVE} AND claimed_at < ? AND (progress_at IS NULL OR progress_at < ?) "
                "AND NOT EXISTS (SELECT 1 FROM mesh_health h WHERE h.machine_id = mesh_task_queue.claimed_by "
                "AND h.status NOT IN ('down', 'left') AND h.last_heartbeat >= ?)",
                (_ts(c.orphan), _ts(c.orphan), _ts(c.orphan)), now, max_attempts, "orphaned",
            )
            stuck_q, stuck_d = self._requeue_failed(
                db, "status IN ('injected', 'running') AND COALESCE(progress_at, claimed_at) < ?",
                (_ts(c.stuck),), now, max_attempts, "stuck",
            )
            counts = ReconcileCounts(
                orphaned_requeued=orph_q, stuck_requeued=stuck_q, expired=expired,
                dead_lettered=down_d + orph_d + stuck_d, dead_machine_claims_requeued=down_q,
            )
            self._event(db, None, "ReconcilerRun", None, now, counts.model_dump())
        return counts

    # Panes ------------------------------------------------------------------------
    def set_pane_state(self, machine_id: str, pane_id: str, now: datetime, *, task_id: str | None,
                       alive: bool, context_ratio: float | None = None,
                       claim_seq: int | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO mesh_pane_state (machine_id, pane_id, task_id, claim_seq, alive, "
                "context_ratio, updated_at) VALUES (?, ?, ?, COALESCE(?, (SELECT claim_seq "
                f"FROM mesh_task_queue WHERE task_id = ? AND claimed_by = ? AND status IN {_ACTIVE})), "
                "?, ?, ?) ON CONFLICT (machine_id, pane_id) DO UPDATE SET "
                "task_id = excluded.task_id, claim_seq = excluded.claim_seq, alive = excluded.alive, "
                "context_ratio = excluded.context_ratio, updated_at = excluded.updated_at",
                (machine_id, pane_id, task_id, claim_seq, task_id, machine_id, int(alive),
                 context_ratio, _ts(now)),
            )

    def pane_states(self, machine_id: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM mesh_pane_state", ()
        if machine_id is not None:
            sql, params = sql + " WHERE machine_id = ?", (machine_id,)
        return [
            {"machine_id": r["machine_id"], "pane_id": r["pane_id"], "task_id": r["task_id"],
             "claim_seq": r["claim_seq"], "alive": bool(r["alive"]), "context_ratio": r["context_ratio"],
             "updated_at": _dt(r["updated_at"])}
            for r in self._query(sql + " ORDER BY machine_id, pane_id", params)
        ]

