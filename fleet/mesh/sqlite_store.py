"""SQLite backend of the MeshStore: the embedded default, one file shared by threads and
processes.

The statements are the named queries of fleet/mesh/queries_sqlite.sql.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from fleet.mesh import rules
from fleet.mesh.immune import task_type
from fleet.mesh.immune_store import SQLiteImmuneOps
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
from fleet.sqlitedb import SQLiteFile
from fleet.store import queries
from fleet.store.timestamps import iso, utc

_SCHEMA = resources.files("fleet.mesh").joinpath("mesh_schema_sqlite.sql").read_text()
QUERIES = queries.load("fleet.mesh", "queries_sqlite.sql")
# Columns added after the first schema, added to older files on open:
# (table, column, the named query that adds it).
_ADDED_COLUMNS = (
    ("mesh_task_queue", "claim_seq", "add_task_claim_seq"),
    ("mesh_pane_state", "claim_seq", "add_pane_claim_seq"),
    ("mesh_task_queue", "mesh_id", "add_task_mesh_id"),
    ("mesh_task_queue", "generation", "add_task_generation"),
    ("mesh_task_queue", "task_type", "add_task_type"),
)


def _ts(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _at(value: str) -> datetime:
    """A NOT NULL timestamp column."""
    return datetime.fromisoformat(value)


def _task(row: sqlite3.Row) -> QueuedTask:
    return QueuedTask(
        task_id=row["task_id"],
        kind=row["kind"],
        command=json.loads(row["command"]),
        target=row["target"],
        model=row["model"],
        status=TaskStatus(row["status"]),
        attempts=row["attempts"],
        claim_seq=row["claim_seq"],
        claimed_by=row["claimed_by"],
        pane_id=row["pane_id"],
        created_at=_at(row["created_at"]),
        claimed_at=_dt(row["claimed_at"]),
        progress_at=_dt(row["progress_at"]),
        finished_at=_dt(row["finished_at"]),
        output=row["output"],
        error=row["error"],
        checkpoint=row["checkpoint"],
        task_type=row["task_type"],
        mesh_id=row["mesh_id"],
        generation=row["generation"],
    )


def _machine(row: sqlite3.Row) -> MachineHealth:
    return MachineHealth(
        machine_id=row["machine_id"],
        mesh_id=row["mesh_id"],
        role=row["role"],
        generation=row["generation"],
        last_heartbeat=_at(row["last_heartbeat"]),
        health_url=row["health_url"],
        active_tasks=json.loads(row["active_tasks"]),
        status=row["status"],
        failed_confirmations=row["failed_confirmations"],
    )


def _ids(db: sqlite3.Connection, query: str, /, **params: Any) -> str:
    """The task ids a candidate query selects, as the JSON list the move statements take."""
    return json.dumps([r["task_id"] for r in db.execute(QUERIES[query], params)])


class SQLiteMeshStore(SQLiteImmuneOps, SQLiteFile):
    """MeshStore on a SQLite file (WAL). Every write is one BEGIN IMMEDIATE transaction, so
    claims are atomic across connections; open one store per thread or process."""

    what = "SQLite mesh store"

    def __init__(self, path: str | Path, *, busy_timeout_seconds: float = 30):
        super().__init__(path, _SCHEMA, busy_timeout_seconds=busy_timeout_seconds)
        with self._tx() as db:
            for table, column, query in _ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(QUERIES["columns_of"], {"table": table})}
                if column not in have:
                    db.execute(QUERIES[query])

    @staticmethod
    def _event(
        db: sqlite3.Connection,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        db.execute(
            QUERIES["append_event"],
            {
                "task_id": task_id,
                "event": event,
                "machine_id": machine_id,
                "now": _ts(now),
                "detail": json.dumps(detail or {}),
            },
        )

    def _rows(self, query: str, /, **params: Any) -> list[sqlite3.Row]:
        return self._query(QUERIES[query], params)

    # Machines --------------------------------------------------------------------
    def heartbeat(
        self,
        identity: MachineIdentity,
        now: datetime,
        health_url: str | None,
        active_tasks: list[str],
    ) -> None:
        with self._tx() as db:
            prev = db.execute(QUERIES["machine"], {"machine_id": identity.machine_id}).fetchone()
            db.execute(
                QUERIES["heartbeat"],
                {
                    "machine_id": identity.machine_id,
                    "mesh_id": identity.mesh_id,
                    "role": identity.role,
                    "generation": identity.generation,
                    "now": _ts(now),
                    "health_url": health_url,
                    "active_tasks": json.dumps(list(active_tasks)),
                },
            )
            if prev is not None and prev["status"] in rules.GONE_MACHINE_STATUSES:
                self._event(
                    db,
                    None,
                    "MachineUp",
                    identity.machine_id,
                    now,
                    {"previous_status": prev["status"]},
                )

    def leave(self, machine_id: str, now: datetime) -> int:
        with self._tx() as db:
            db.execute(QUERIES["mark_left"], {"machine_id": machine_id, "now": _ts(now)})
            moving = {
                "task_ids": _ids(db, "active_of_machine", machine_id=machine_id),
                "now": _ts(now),
            }
            db.execute(QUERIES["requeue_left_events"], moving)
            moved = db.execute(QUERIES["requeue_left"], moving).rowcount
            self._event(db, None, "MachineLeft", machine_id, now, {"requeued": moved})
        return moved

    def machines(self) -> list[MachineHealth]:
        return [_machine(r) for r in self._rows("machines")]

    def record_confirmation(
        self, machine_id: str, failed: bool, now: datetime, *, stale_before: datetime | None = None
    ) -> MachineHealth:
        with self._tx() as db:
            row = db.execute(QUERIES["machine"], {"machine_id": machine_id}).fetchone()
            if row is None:
                raise unknown_machine(machine_id)
            status, count = rules.confirmation_update(
                row["status"],
                row["failed_confirmations"],
                _at(row["last_heartbeat"]),
                failed,
                utc(stale_before) if stale_before else None,
            )
            if (status, count) != (row["status"], row["failed_confirmations"]):
                row = db.execute(
                    QUERIES["set_machine_status"],
                    {
                        "status": status,
                        "failed_confirmations": count,
                        "now": _ts(now),
                        "machine_id": machine_id,
                    },
                ).fetchone()
        return _machine(row)

    def mark_down(
        self,
        machine_id: str,
        now: datetime,
        *,
        stale_before: datetime | None = None,
        max_attempts: int | None = None,
    ) -> int:
        max_attempts = default_max_attempts() if max_attempts is None else max_attempts
        with self._tx() as db:
            row = db.execute(QUERIES["machine"], {"machine_id": machine_id}).fetchone()
            if row is None:
                raise unknown_machine(machine_id)
            if stale_before is not None and _at(row["last_heartbeat"]) >= utc(stale_before):
                return -1  # it heartbeated while we were confirming: not down
            db.execute(QUERIES["mark_down"], {"machine_id": machine_id, "now": _ts(now)})
            requeued, dead = self._requeue_failed(
                db,
                _ids(db, "active_of_machine", machine_id=machine_id),
                now,
                max_attempts,
                "machine_down",
            )
            self._event(
                db,
                None,
                "MachineDown",
                machine_id,
                now,
                {"requeued": requeued, "dead_lettered": dead},
            )
        return requeued + dead

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
        with self._tx() as db:
            row = db.execute(
                QUERIES["enqueue"],
                {
                    "task_id": task_id,
                    "kind": kind,
                    "command": json.dumps(list(command)),
                    "target": target,
                    "model": model,
                    "now": _ts(now),
                    "task_type": task_type(kind, command),
                    "mesh_id": mesh_id or None,
                    "generation": generation,
                },
            ).fetchone()
            if row is not None:
                self._event(db, task_id, "queued", None, now, {"kind": kind, "target": target})
        return task_id

    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        # The twin of 0003's mesh_claim: quarantines, probes, weights and mesh identity.
        return self.immune_claim(machine_id, now, limit)

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
        finished = _ts(now) if status in (TaskStatus.DONE, TaskStatus.FAILED) else None
        with self._tx() as db:
            row = db.execute(
                QUERIES["transition"],
                {
                    "status": status.value,
                    "now": _ts(now),
                    "pane_id": pane_id,
                    "output": output,
                    "error": error,
                    "finished_at": finished,
                    "task_id": task_id,
                    "machine_id": machine_id,
                    "claim": claim_seq,
                },
            ).fetchone()
            if row is None:
                return False
            detail: dict[str, Any] = {"pane_id": row["pane_id"]}
            if error:
                detail["error"] = error[:500]
            self._event(db, task_id, status.value, machine_id, now, detail)
        return True

    def progress(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        note: str | None = None,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        with self._tx() as db:
            row = db.execute(
                QUERIES["progress"],
                {
                    "now": _ts(now),
                    "task_id": task_id,
                    "machine_id": machine_id,
                    "claim": claim_seq,
                },
            ).fetchone()
            if row is None:
                return False
            if note is not None:
                self._event(db, task_id, "Progress", machine_id, now, {"note": note[:2000]})
        return True

    def handoff(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        checkpoint: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        with self._tx() as db:
            row = db.execute(
                QUERIES["handoff"],
                {
                    "checkpoint": checkpoint,
                    "task_id": task_id,
                    "machine_id": machine_id,
                    "claim": claim_seq,
                },
            ).fetchone()
            if row is None:
                return False
            self._event(
                db,
                task_id,
                "Handoff",
                machine_id,
                now,
                {
                    "status": "queued",
                    "attempts": row["attempts"],
                    "checkpoint_chars": len(checkpoint),
                },
            )
        return True

    def get_task(self, task_id: str) -> QueuedTask | None:
        rows = self._rows("get_task", task_id=task_id)
        return _task(rows[0]) if rows else None

    def tasks_of(self, machine_id: str) -> list[QueuedTask]:
        return [_task(r) for r in self._rows("tasks_of", machine_id=machine_id)]

    def events(self, task_id: str | None = None, *, event: str | None = None) -> list[TaskEvent]:
        return [
            TaskEvent(
                task_id=r["task_id"],
                event=r["event"],
                machine_id=r["machine_id"],
                at=_at(r["at"]),
                detail=json.loads(r["detail"]),
            )
            for r in self._rows("events", task_id=task_id, event=event)
        ]

    def queue_stats(self, now: datetime) -> dict[str, Any]:
        depth = {s.value: 0 for s in TaskStatus}
        for r in self._rows("queue_depth"):
            depth[r["status"]] = r["n"]
        oldest = self._rows("oldest_queued")
        oldest_at = _dt(oldest[0]["t"]) if oldest else None
        return {
            "depth": depth,
            "oldest_queued_age_seconds": (utc(now) - oldest_at).total_seconds()
            if oldest_at
            else None,
            "dead_letter": depth[TaskStatus.DEAD_LETTER.value],
        }

    # Reconciler -------------------------------------------------------------------
    @staticmethod
    def _requeue_failed(
        db: sqlite3.Connection, task_ids: str, now: datetime, max_attempts: int, reason: str
    ) -> tuple[int, int]:
        """Requeue the tasks `task_ids` (a JSON list) as one failed attempt each; returns
        (requeued, dead-lettered)."""
        params = {
            "task_ids": task_ids,
            "now": _ts(now),
            "max_attempts": max_attempts,
            "reason": reason,
        }
        db.execute(QUERIES["requeue_failed_events"], params)
        rows = db.execute(QUERIES["requeue_failed"], params).fetchall()
        dead = sum(1 for r in rows if r["status"] == TaskStatus.DEAD_LETTER.value)
        return len(rows) - dead, dead

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
        c = rules.cutoffs(
            now, rules.Thresholds(orphan_seconds, stuck_seconds, expiry_seconds, max_attempts)
        )
        own = {m: rules.cutoffs(now, t) for m, t in (by_machine or {}).items()}
        orphan_by_machine = json.dumps({m: _ts(o.orphan) for m, o in own.items()})
        stuck_by_machine = json.dumps({m: _ts(o.stuck) for m, o in own.items()})
        with self._tx() as db:
            # The rules in rules.Verdict's order: a row an earlier rule moved is not active
            # any more when the next rule selects its candidates.
            expiring = {
                "task_ids": _ids(db, "reconcile_expired", expiry=_ts(c.expiry)),
                "now": _ts(now),
                "error": f"expired: not finished within {expiry_seconds:g} s of creation",
            }
            db.execute(QUERIES["expire_events"], expiring)
            expired = db.execute(QUERIES["expire"], expiring).rowcount
            down_q, down_d = self._requeue_failed(
                db, _ids(db, "reconcile_machine_down"), now, max_attempts, "machine_down"
            )
            orph_q, orph_d = self._requeue_failed(
                db,
                _ids(
                    db,
                    "reconcile_orphaned",
                    orphan=_ts(c.orphan),
                    orphan_by_machine=orphan_by_machine,
                ),
                now,
                max_attempts,
                "orphaned",
            )
            stuck_q, stuck_d = self._requeue_failed(
                db,
                _ids(db, "reconcile_stuck", stuck=_ts(c.stuck), stuck_by_machine=stuck_by_machine),
                now,
                max_attempts,
                "stuck",
            )
            counts = ReconcileCounts(
                orphaned_requeued=orph_q,
                stuck_requeued=stuck_q,
                expired=expired,
                dead_lettered=down_d + orph_d + stuck_d,
                dead_machine_claims_requeued=down_q,
            )
            self._event(db, None, "ReconcilerRun", None, now, counts.model_dump())
        return counts

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
        with self._tx() as db:
            db.execute(
                QUERIES["set_pane_state"],
                {
                    "machine_id": machine_id,
                    "pane_id": pane_id,
                    "task_id": task_id,
                    "claim": claim_seq,
                    "alive": int(alive),
                    "context_ratio": context_ratio,
                    "now": _ts(now),
                },
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
                "updated_at": _dt(r["updated_at"]),
            }
            for r in self._rows("pane_states", machine_id=machine_id)
        ]

    # Heartbeat history (the twin of 0008_heartbeat_log.sql) ----------------------
    def heartbeat_log(self, since: datetime, until: datetime) -> dict[str, list[datetime]]:
        """Every heartbeat logged in [since, until], per machine, oldest first (the log keeps
        8 days)."""
        beats: dict[str, list[datetime]] = {}
        for r in self._rows("heartbeat_log", since=_ts(since), until=_ts(until)):
            beats.setdefault(r["machine_id"], []).append(datetime.fromisoformat(r["at"]))
        return beats
