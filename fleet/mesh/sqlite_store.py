"""SQLite backend of the MeshStore: the embedded default, one file shared by threads and
processes.

The statements are the named queries of fleet/mesh/queries_sqlite.sql and
immune_queries_sqlite.sql. The logic both backends share is fleet/mesh/sql_store.py's; here
are SQLite's own steps: the twins, in Python, of the SQL functions and event-appending
statements PostgreSQL runs (0002_mesh.sql, 0003_immune.sql, queries.sql).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fleet.mesh import rules
from fleet.mesh.immune_store import ImmuneOps
from fleet.mesh.sql_store import Params, Queries, Row, Tx
from fleet.mesh.store import QueuedTask, ReconcileCounts, TaskStatus
from fleet.sqlitedb import SQLiteFile
from fleet.store import queries
from fleet.store.timestamps import iso

_SCHEMA = resources.files("fleet.mesh").joinpath("mesh_schema_sqlite.sql").read_text()
QUERIES = queries.load("fleet.mesh", "queries_sqlite.sql")
IMMUNE = queries.load("fleet.mesh", "immune_queries_sqlite.sql")
T = TypeVar("T")
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


def _ids(tx: Tx, query: str, /, **params: Any) -> str:
    """The task ids a candidate query selects, as the JSON list the move statements take."""
    return json.dumps([r["task_id"] for r in tx.execute(query, **params)])


# The event each fenced write appends (PostgreSQL's statements append the same ones):
# (the updated row, the write's parameters) -> (event, detail), or None for no event.
_FENCED_EVENTS: dict[str, Callable[[Row, dict[str, Any]], tuple[str, dict[str, Any]] | None]] = {
    "transition": lambda row, p: (
        p["status"],
        {"pane_id": row["pane_id"]} | ({"error": p["error"][:500]} if p["error"] else {}),
    ),
    "progress": lambda row, p: (
        ("Progress", {"note": p["note"][:2000]}) if p["note"] is not None else None
    ),
    "handoff": lambda row, p: (
        "Handoff",
        {"status": "queued", "attempts": row["attempts"], "checkpoint_chars": len(p["checkpoint"])},
    ),
    "requeue_unattempted": lambda row, p: (
        "queued",
        {"reason": "rate_limited", "attempts": row["attempts"], "message": p["message"][:500]},
    ),
}


class SQLiteMeshStore(SQLiteFile, ImmuneOps):
    """MeshStore on a SQLite file (WAL). Every write is one BEGIN IMMEDIATE transaction, so
    claims are atomic across connections; open one store per thread or process."""

    what = "SQLite mesh store"
    _mesh = QUERIES
    _immune = IMMUNE

    def __init__(self, path: str | Path, *, busy_timeout_seconds: float = 30):
        super().__init__(path, _SCHEMA, busy_timeout_seconds=busy_timeout_seconds)
        with self._tx() as db:
            for table, column, query in _ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(QUERIES["columns_of"], {"table": table})}
                if column not in have:
                    db.execute(QUERIES[query])

    # Backend primitives (fleet/mesh/sql_store.py) ---------------------------------
    def _time(self, value: datetime | None) -> str | None:
        return _ts(value)

    def _json(self, value: Any) -> str:
        return json.dumps(value)

    def _col_time(self, value: str | None) -> datetime | None:
        return _dt(value)

    def _col_json(self, value: str) -> Any:
        return json.loads(value)

    def _write(self, work: Callable[[Tx], T], queries: Mapping[str, str] | None = None) -> T:
        with self._tx() as db:
            return work(Tx(db, queries or QUERIES, self))

    def _requeue_left(self, tx: Tx, machine_id: str, now: datetime) -> int:
        moving = {"task_ids": _ids(tx, "active_of_machine", machine_id=machine_id), "now": _ts(now)}
        tx.execute("requeue_left_events", **moving)
        return tx.execute("requeue_left", **moving).rowcount

    def _requeue_down(
        self, tx: Tx, machine_id: str, now: datetime, max_attempts: int
    ) -> tuple[int, int]:
        moving = _ids(tx, "active_of_machine", machine_id=machine_id)
        return self._requeue_failed(tx, moving, now, max_attempts, "machine_down")

    def _enqueue(self, params: dict[str, Any], now: datetime) -> None:
        def work(tx: Tx) -> None:
            if tx.find("enqueue", **params) is not None:
                detail = {"kind": params["kind"], "target": params["target"]}
                tx.event(params["task_id"], "queued", None, now, detail)

        self._write(work)

    def _fenced(self, query: str, now: datetime, params: Params, queries: Queries) -> bool:
        def work(tx: Tx) -> bool:
            row = tx.find(query, now=_ts(now), **params)
            if row is None:
                return False
            event = _FENCED_EVENTS[query](row, params)
            if event is not None:
                tx.event(params["task_id"], event[0], params["machine_id"], now, event[1])
            return True

        return self._write(work, queries)

    # SQLite's own: the twins of PostgreSQL's SQL functions ---------------------------
    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        """The twin of 0003's mesh_claim: quarantines, probes, weights and mesh identity."""
        machine = f"machine:{machine_id}"
        with self._tx() as db:
            h = db.execute(IMMUNE["claimer"], {"machine_id": machine_id}).fetchone()
            if h is None or h["status"] in ("down", "left") or h["role"] == "viewer" or limit <= 0:
                return []
            s = db.execute(IMMUNE["immune_state"], {"subject": machine}).fetchone()
            probe, credit = False, None
            if s is not None and s["tier"] >= 2:
                if s["probe_task"] is not None or s["until_at"] is None or s["until_at"] > _ts(now):
                    return []
                probe, limit = True, 1
            elif (
                s is not None
                and s["tier"] == 1
                and s["until_at"] is not None
                and s["until_at"] > _ts(now)
                and s["weight"] < 1
            ):
                credit = min(s["claim_credit"] + s["weight"] * limit, float(limit))
                limit = math.floor(credit)
                if limit == 0:
                    db.execute(IMMUNE["set_claim_credit"], {"credit": credit, "subject": machine})
                    return []
            rows = db.execute(
                IMMUNE["claim"],
                {
                    "machine_id": machine_id,
                    "now": _ts(now),
                    "mesh_id": h["mesh_id"],
                    "generation": h["generation"],
                    "limit": limit,
                },
            ).fetchall()
            tasks = sorted(
                (self._task_of(r) for r in rows), key=lambda t: (t.created_at, t.task_id)
            )
            tx = Tx(db, IMMUNE, self)
            for t in tasks:
                detail = {"attempts": t.attempts, "claim_seq": t.claim_seq}
                tx.event(t.task_id, "claimed", machine_id, now, detail)
            seen: set[str] = set()
            for t in tasks:  # a due, hard-quarantined task type: this row is its probe
                if t.task_type and t.task_type not in seen:
                    seen.add(t.task_type)
                    db.execute(
                        IMMUNE["set_type_probe"],
                        {
                            "task_id": t.task_id,
                            "now": _ts(now),
                            "subject": f"task_type:{t.task_type}",
                        },
                    )
            if probe and tasks:
                db.execute(
                    IMMUNE["set_machine_probe"],
                    {"task_id": tasks[0].task_id, "now": _ts(now), "subject": machine},
                )
            elif credit is not None:
                db.execute(
                    IMMUNE["set_claim_credit"], {"credit": credit - len(tasks), "subject": machine}
                )
        return tasks

    @staticmethod
    def _requeue_failed(
        tx: Tx, task_ids: str, now: datetime, max_attempts: int, reason: str
    ) -> tuple[int, int]:
        """The twin of 0002's mesh_requeue_failed: requeue the tasks `task_ids` (a JSON list)
        as one failed attempt each; returns (requeued, dead-lettered)."""
        params = {
            "task_ids": task_ids,
            "now": _ts(now),
            "max_attempts": max_attempts,
            "reason": reason,
        }
        tx.execute("requeue_failed_events", **params)
        rows = tx.execute("requeue_failed", **params).fetchall()
        dead = sum(1 for r in rows if r["status"] == TaskStatus.DEAD_LETTER.value)
        return len(rows) - dead, dead

    def _reconcile(
        self, now: datetime, limits: rules.Thresholds, by_machine: dict[str, rules.Thresholds]
    ) -> ReconcileCounts:
        """The twin of 0007's mesh_reconcile_by_machine."""
        c = rules.cutoffs(now, limits)
        own = {m: rules.cutoffs(now, t) for m, t in by_machine.items()}
        orphan_by_machine = json.dumps({m: _ts(o.orphan) for m, o in own.items()})
        stuck_by_machine = json.dumps({m: _ts(o.stuck) for m, o in own.items()})

        def work(tx: Tx) -> ReconcileCounts:
            def requeue(query: str, reason: str, **cutoff: Any) -> tuple[int, int]:
                moving = _ids(tx, query, **cutoff)
                return self._requeue_failed(tx, moving, now, limits.max_attempts, reason)

            # The rules in rules.Verdict's order: a row an earlier rule moved is not active
            # any more when the next rule selects its candidates.
            expiring = {
                "task_ids": _ids(tx, "reconcile_expired", expiry=_ts(c.expiry)),
                "now": _ts(now),
                "error": f"expired: not finished within {limits.expiry_seconds:g} s of creation",
            }
            tx.execute("expire_events", **expiring)
            expired = tx.execute("expire", **expiring).rowcount
            down_q, down_d = requeue("reconcile_machine_down", "machine_down")
            orph_q, orph_d = requeue(
                "reconcile_orphaned",
                "orphaned",
                orphan=_ts(c.orphan),
                orphan_by_machine=orphan_by_machine,
            )
            stuck_q, stuck_d = requeue(
                "reconcile_stuck", "stuck", stuck=_ts(c.stuck), stuck_by_machine=stuck_by_machine
            )
            counts = ReconcileCounts(
                orphaned_requeued=orph_q,
                stuck_requeued=stuck_q,
                expired=expired,
                dead_lettered=down_d + orph_d + stuck_d,
                dead_machine_claims_requeued=down_q,
            )
            tx.event(None, "ReconcilerRun", None, now, counts.model_dump())
            return counts

        return self._write(work)
