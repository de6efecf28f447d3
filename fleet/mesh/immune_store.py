"""The immune system's persistence on both mesh backends: states, antibodies, events, cursors,
shared breaker states, and the claim that honours quarantines and mesh identity.

Mixed into SQLiteMeshStore and PgMeshStore (their `_tx`/`_query`); PostgreSQL's claim is the
`mesh_claim` of supabase/migrations/0003_immune.sql, SQLite's is its twin below, and the
contract tests (tests/mesh/test_immune_store.py) hold them to the same behaviour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from fleet.mesh.immune import Action, Antibody, ImmunePolicy, Subject, SubjectState, Tier
from fleet.mesh.store import QueuedTask

_ACTIVE = "('claimed', 'injected', 'running')"
# A claim may have picked the probe since the state was read: a save that does not know of
# it (same exclusion, no probe) keeps it, so a second probe is never let through.
_KEEP_PROBE = (
    "CASE WHEN excluded.tier >= 2 AND excluded.probe_task IS NULL "
    "AND excluded.until_at = mesh_immune_state.until_at "
    "THEN mesh_immune_state.probe_task ELSE excluded.probe_task END"
)


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _utc(value).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")  # type: ignore[union-attr]


def _dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return _utc(value)
    return datetime.fromisoformat(value)


def state_from_row(row: Any) -> SubjectState:
    def times(value: Any) -> tuple[datetime, ...]:
        if isinstance(value, str):
            value = json.loads(value)
        return tuple(sorted(_dt(t) for t in value))  # type: ignore[misc]

    return SubjectState(
        subject=Subject.parse(row["subject"]),
        tier=Tier(row["tier"]),
        failures=times(row["failures"]),
        successes=times(row["successes"]),
        ejections=row["ejections"],
        until=_dt(row["until_at"]),
        probe_task=row["probe_task"],
        backoff_until=_dt(row["backoff_until"]),
        sensitivity=row["sensitivity"],
        reason=row["reason"],
        antibody=row["antibody"],
        changed_at=_dt(row["changed_at"]),
    )


def state_params(state: SubjectState, policy: ImmunePolicy, now: datetime) -> dict[str, Any]:
    weight = policy.soft_weight if state.tier == Tier.SOFT else 1.0
    return {
        "subject": str(state.subject),
        "kind": state.subject.kind,
        "tier": int(state.tier),
        "weight": weight,
        "failures": json.dumps([_ts(t) for t in state.failures]),
        "successes": json.dumps([_ts(t) for t in state.successes]),
        "ejections": state.ejections,
        "until_at": state.until,
        "probe_task": state.probe_task,
        "backoff_until": state.backoff_until,
        "sensitivity": state.sensitivity,
        "reason": state.reason[:500],
        "antibody": state.antibody,
        "changed_at": state.changed_at,
        "updated_at": now,
    }


def breaker_row(name: str, holder: str, snapshot: dict[str, Any], now: datetime) -> dict[str, Any]:
    return {
        "name": name,
        "holder": holder,
        "state": snapshot["state"],
        "failures": int(snapshot.get("failures") or 0),
        "opened_at": _dt(snapshot.get("opened_at")),
        "retry_at": _dt(snapshot.get("retry_at")),
        "last_error": snapshot.get("last_error"),
        "updated_at": now,
    }


@runtime_checkable
class ImmuneStore(Protocol):
    """What the immune system, the breakers and the operators need from a mesh store."""

    def immune_states(self, kind: str | None = None) -> list[SubjectState]: ...
    def save_immune(
        self,
        states: Iterable[SubjectState],
        actions: Iterable[Action],
        policy: ImmunePolicy,
        now: datetime,
        *,
        cursor: tuple[str, int] | None = None,
    ) -> None:
        """Upsert states, append one event per action and move a feed cursor, atomically."""

    def lift(self, subject: Subject, now: datetime, by: str = "operator") -> bool:
        """Release a subject at once (operator); False when it was not quarantined."""

    def immune_events(self, subject: str | None = None) -> list[dict[str, Any]]: ...
    def antibodies(self) -> list[Antibody]: ...
    def record_antibody(
        self, signature: str, corrective: str, worked: bool, now: datetime
    ) -> None: ...
    def task_events_after(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """mesh_task_events rows with id > after_id (id order), each with its task's task_type."""

    def event_cursor(self, name: str) -> int: ...
    def requeue_unattempted(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        reason: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        """Back to the queue without counting a failed attempt (a rate limit); conditional like
        transition."""

    def record_event(
        self,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an agent-observed event (e.g. PaneRespawned) to mesh_task_events."""

    def record_breaker(
        self, name: str, holder: str, snapshot: dict[str, Any], now: datetime
    ) -> None: ...
    def breaker_rows(self) -> list[dict[str, Any]]: ...


class SQLiteImmuneOps:
    """ImmuneStore on the SQLite mesh file; the claim twin of 0003_immune.sql's mesh_claim."""

    _tx: Any
    _query: Any

    # Claim ---------------------------------------------------------------------------
    def immune_claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        from fleet.mesh.sqlite_store import _task

        with self._tx() as db:
            h = db.execute(
                "SELECT mesh_id, generation, role, status FROM mesh_health WHERE machine_id = ?",
                (machine_id,),
            ).fetchone()
            if h is None or h["status"] in ("down", "left") or h["role"] == "viewer" or limit <= 0:
                return []
            s = db.execute(
                "SELECT * FROM mesh_immune_state WHERE subject = ?", (f"machine:{machine_id}",)
            ).fetchone()
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
                    db.execute(
                        "UPDATE mesh_immune_state SET claim_credit = ? WHERE subject = ?",
                        (credit, f"machine:{machine_id}"),
                    )
                    return []
            rows = db.execute(
                "UPDATE mesh_task_queue SET status = 'claimed', claimed_by = ?, claimed_at = ?, "
                "claim_seq = claim_seq + 1, progress_at = NULL, pane_id = NULL WHERE task_id IN ("
                "  SELECT q.task_id FROM mesh_task_queue q WHERE q.status = 'queued' "
                "  AND (q.target IS NULL OR q.target = ?) "
                "  AND (q.mesh_id IS NULL OR q.mesh_id = ?) "
                "  AND (q.generation IS NULL OR q.generation = ?) "
                "  AND NOT EXISTS (SELECT 1 FROM mesh_immune_state s "
                "    WHERE s.subject = 'task_type:' || q.task_type AND s.tier >= 2 "
                "    AND (s.probe_task IS NOT NULL OR s.until_at IS NULL OR s.until_at > ?)) "
                "  AND (NOT EXISTS (SELECT 1 FROM mesh_immune_state s "
                "    WHERE s.subject = 'task_type:' || q.task_type AND s.tier >= 2) "
                "    OR q.task_id = (SELECT q2.task_id FROM mesh_task_queue q2 "
                "      WHERE q2.status = 'queued' AND q2.task_type = q.task_type "
                "      ORDER BY q2.created_at, q2.task_id LIMIT 1)) "
                "  ORDER BY q.created_at, q.task_id LIMIT ?"
                ") RETURNING *",
                (machine_id, _ts(now), machine_id, h["mesh_id"], h["generation"], _ts(now), limit),
            ).fetchall()
            tasks = sorted((_task(r) for r in rows), key=lambda t: (t.created_at, t.task_id))
            db.executemany(
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "VALUES (?, 'claimed', ?, ?, ?)",
                [
                    (
                        t.task_id,
                        machine_id,
                        _ts(now),
                        json.dumps({"attempts": t.attempts, "claim_seq": t.claim_seq}),
                    )
                    for t in tasks
                ],
            )
            seen: set[str] = set()
            for t in tasks:  # a due, hard-quarantined task type: this row is its probe
                if t.task_type and t.task_type not in seen:
                    seen.add(t.task_type)
                    db.execute(
                        "UPDATE mesh_immune_state SET probe_task = ?, updated_at = ? "
                        "WHERE subject = ? AND tier >= 2 AND probe_task IS NULL",
                        (t.task_id, _ts(now), f"task_type:{t.task_type}"),
                    )
            if probe and tasks:
                db.execute(
                    "UPDATE mesh_immune_state SET probe_task = ?, updated_at = ? WHERE subject = ?",
                    (tasks[0].task_id, _ts(now), f"machine:{machine_id}"),
                )
            elif credit is not None:
                db.execute(
                    "UPDATE mesh_immune_state SET claim_credit = ? WHERE subject = ?",
                    (credit - len(tasks), f"machine:{machine_id}"),
                )
        return tasks

    # States --------------------------------------------------------------------------
    def immune_states(self, kind: str | None = None) -> list[SubjectState]:
        sql, params = "SELECT * FROM mesh_immune_state", tuple[str, ...]()
        if kind is not None:
            sql, params = sql + " WHERE kind = ?", (kind,)
        return [state_from_row(r) for r in self._query(sql + " ORDER BY subject", params)]

    def save_immune(
        self,
        states: Iterable[SubjectState],
        actions: Iterable[Action],
        policy: ImmunePolicy,
        now: datetime,
        *,
        cursor: tuple[str, int] | None = None,
    ) -> None:
        rows = [state_params(s, policy, now) for s in states]
        for r in rows:
            for key in ("until_at", "backoff_until", "changed_at", "updated_at"):
                r[key] = _ts(r[key])
        with self._tx() as db:
            db.executemany(
                "INSERT INTO mesh_immune_state (subject, kind, tier, weight, failures, successes, "
                "ejections, until_at, probe_task, backoff_until, sensitivity, reason, antibody, "
                "changed_at, updated_at) VALUES (:subject, :kind, :tier, :weight, :failures, "
                ":successes, :ejections, :until_at, :probe_task, :backoff_until, :sensitivity, "
                ":reason, :antibody, :changed_at, :updated_at) "
                "ON CONFLICT (subject) DO UPDATE SET tier = excluded.tier, weight = excluded.weight, "
                "failures = excluded.failures, successes = excluded.successes, "
                "ejections = excluded.ejections, "
                "until_at = excluded.until_at, probe_task = " + _KEEP_PROBE + ", "
                "backoff_until = excluded.backoff_until, sensitivity = excluded.sensitivity, "
                "reason = excluded.reason, antibody = excluded.antibody, changed_at = excluded.changed_at, "
                "updated_at = excluded.updated_at, "
                "claim_credit = CASE WHEN excluded.tier = 1 THEN claim_credit ELSE 0 END",
                rows,
            )
            db.executemany(
                "INSERT INTO mesh_immune_events (subject, action, tier, at, detail) VALUES (?, ?, ?, ?, ?)",
                [
                    (str(a.subject), a.kind, int(a.tier), _ts(now), json.dumps(a.detail))
                    for a in actions
                ],
            )
            if cursor is not None:
                db.execute(
                    "INSERT INTO mesh_event_cursor (name, last_event_id, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET last_event_id = "
                    "max(mesh_event_cursor.last_event_id, excluded.last_event_id), "
                    "updated_at = excluded.updated_at",
                    (cursor[0], cursor[1], _ts(now)),
                )

    def lift(self, subject: Subject, now: datetime, by: str = "operator") -> bool:
        with self._tx() as db:
            row = db.execute(
                "UPDATE mesh_immune_state SET tier = 0, weight = 1, failures = '[]', successes = '[]', "
                "until_at = NULL, "
                "probe_task = NULL, backoff_until = NULL, claim_credit = 0, reason = ?, "
                "changed_at = ?, updated_at = ? WHERE subject = ? "
                "AND (tier > 0 OR backoff_until IS NOT NULL) RETURNING subject",
                (f"lifted by {by}", _ts(now), _ts(now), str(subject)),
            ).fetchone()
            if row is not None:
                db.execute(
                    "INSERT INTO mesh_immune_events (subject, action, tier, at, detail) "
                    "VALUES (?, 'lift', 0, ?, ?)",
                    (str(subject), _ts(now), json.dumps({"by": by})),
                )
        return row is not None

    def immune_events(self, subject: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM mesh_immune_events", tuple[str, ...]()
        if subject is not None:
            sql, params = sql + " WHERE subject = ?", (subject,)
        return [
            {
                "id": r["id"],
                "subject": r["subject"],
                "action": r["action"],
                "tier": r["tier"],
                "at": _dt(r["at"]),
                "detail": json.loads(r["detail"]),
            }
            for r in self._query(sql + " ORDER BY id", params)
        ]

    # Antibodies ----------------------------------------------------------------------
    def antibodies(self) -> list[Antibody]:
        return [
            Antibody(r["signature"], r["corrective"], r["successes"], r["failures"])
            for r in self._query("SELECT * FROM mesh_antibodies ORDER BY signature, corrective")
        ]

    def record_antibody(self, signature: str, corrective: str, worked: bool, now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO mesh_antibodies (signature, corrective, successes, failures, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (signature, corrective) DO UPDATE SET "
                "successes = successes + excluded.successes, failures = failures + excluded.failures, "
                "updated_at = excluded.updated_at",
                (signature, corrective, int(worked), int(not worked), _ts(now)),
            )

    # Feed ----------------------------------------------------------------------------
    def task_events_after(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT e.id, e.task_id, e.event, e.machine_id, e.at, e.detail, q.task_type, q.error "
            "FROM mesh_task_events e LEFT JOIN mesh_task_queue q ON q.task_id = e.task_id "
            "WHERE e.id > ? ORDER BY e.id LIMIT ?",
            (after_id, limit),
        )
        return [{**dict(r), "at": _dt(r["at"]), "detail": json.loads(r["detail"])} for r in rows]

    def event_cursor(self, name: str) -> int:
        rows = self._query("SELECT last_event_id FROM mesh_event_cursor WHERE name = ?", (name,))
        return rows[0]["last_event_id"] if rows else 0

    def requeue_unattempted(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        reason: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        with self._tx() as db:
            row = db.execute(
                "UPDATE mesh_task_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL, "
                "progress_at = NULL, pane_id = NULL "
                f"WHERE task_id = ? AND claimed_by = ? AND status IN {_ACTIVE} "
                "AND (? IS NULL OR claim_seq = ?) RETURNING attempts",
                (task_id, machine_id, claim_seq, claim_seq),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "VALUES (?, 'queued', ?, ?, ?)",
                (
                    task_id,
                    machine_id,
                    _ts(now),
                    json.dumps(
                        {
                            "reason": "rate_limited",
                            "attempts": row["attempts"],
                            "message": reason[:500],
                        }
                    ),
                ),
            )
        return True

    def record_event(
        self,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                (task_id, event, machine_id, _ts(now), json.dumps(detail or {})),
            )

    # Breakers ------------------------------------------------------------------------
    def record_breaker(
        self, name: str, holder: str, snapshot: dict[str, Any], now: datetime
    ) -> None:
        row = breaker_row(name, holder, snapshot, now)
        for key in ("opened_at", "retry_at", "updated_at"):
            row[key] = _ts(row[key])
        with self._tx() as db:
            db.execute(
                "INSERT INTO mesh_breaker_state (name, holder, state, failures, opened_at, retry_at, "
                "last_error, updated_at) VALUES (:name, :holder, :state, :failures, :opened_at, "
                ":retry_at, :last_error, :updated_at) ON CONFLICT (name, holder) DO UPDATE SET "
                "state = excluded.state, failures = excluded.failures, opened_at = excluded.opened_at, "
                "retry_at = excluded.retry_at, last_error = excluded.last_error, "
                "updated_at = excluded.updated_at",
                row,
            )

    def breaker_rows(self) -> list[dict[str, Any]]:
        return [
            {
                **dict(r),
                "opened_at": _dt(r["opened_at"]),
                "retry_at": _dt(r["retry_at"]),
                "updated_at": _dt(r["updated_at"]),
            }
            for r in self._query("SELECT * FROM mesh_breaker_state ORDER BY name, holder")
        ]


class PgImmuneOps:
    """ImmuneStore on PostgreSQL; the claim itself is mesh_claim (0003_immune.sql)."""

    _tx: Any
    _query: Any

    def immune_states(self, kind: str | None = None) -> list[SubjectState]:
        rows = self._query(
            "SELECT * FROM mesh_immune_state WHERE (%(k)s::text IS NULL OR kind = %(k)s) "
            "ORDER BY subject",
            {"k": kind},
        )
        return [state_from_row(r) for r in rows]

    def save_immune(
        self,
        states: Iterable[SubjectState],
        actions: Iterable[Action],
        policy: ImmunePolicy,
        now: datetime,
        *,
        cursor: tuple[str, int] | None = None,
    ) -> None:
        from psycopg.types.json import Jsonb

        rows = [state_params(s, policy, now) for s in states]
        with self._tx() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO mesh_immune_state (subject, kind, tier, weight, failures, "
                    "successes, ejections, until_at, probe_task, backoff_until, sensitivity, reason, "
                    "antibody, changed_at, updated_at) VALUES (%(subject)s, %(kind)s, %(tier)s, "
                    "%(weight)s, %(failures)s::jsonb, %(successes)s::jsonb, %(ejections)s, "
                    "%(until_at)s, %(probe_task)s, %(backoff_until)s, %(sensitivity)s, %(reason)s, "
                    "%(antibody)s, %(changed_at)s, %(updated_at)s) "
                    "ON CONFLICT (subject) DO UPDATE SET tier = excluded.tier, weight = excluded.weight, "
                    "failures = excluded.failures, successes = excluded.successes, "
                    "ejections = excluded.ejections, "
                    "until_at = excluded.until_at, probe_task = " + _KEEP_PROBE + ", "
                    "backoff_until = excluded.backoff_until, sensitivity = excluded.sensitivity, "
                    "reason = excluded.reason, antibody = excluded.antibody, changed_at = excluded.changed_at, "
                    "updated_at = excluded.updated_at, "
                    "claim_credit = CASE WHEN excluded.tier = 1 THEN mesh_immune_state.claim_credit "
                    "ELSE 0 END",
                    rows,
                )
                cur.executemany(
                    "INSERT INTO mesh_immune_events (subject, action, tier, at, detail) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(str(a.subject), a.kind, int(a.tier), now, Jsonb(a.detail)) for a in actions],
                )
            if cursor is not None:
                conn.execute(
                    "INSERT INTO mesh_event_cursor AS c (name, last_event_id, updated_at) "
                    "VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE SET last_event_id = "
                    "greatest(c.last_event_id, excluded.last_event_id), updated_at = excluded.updated_at",
                    (cursor[0], cursor[1], now),
                )

    def lift(self, subject: Subject, now: datetime, by: str = "operator") -> bool:
        from psycopg.types.json import Jsonb

        with self._tx() as conn:
            row = conn.execute(
                "UPDATE mesh_immune_state SET tier = 0, weight = 1, failures = '[]'::jsonb, "
                "successes = '[]'::jsonb, "
                "until_at = NULL, probe_task = NULL, backoff_until = NULL, claim_credit = 0, "
                "reason = %(r)s, changed_at = %(now)s, updated_at = %(now)s WHERE subject = %(s)s "
                "AND (tier > 0 OR backoff_until IS NOT NULL) RETURNING subject",
                {"r": f"lifted by {by}", "now": now, "s": str(subject)},
            ).fetchone()
            if row is not None:
                conn.execute(
                    "INSERT INTO mesh_immune_events (subject, action, tier, at, detail) "
                    "VALUES (%s, 'lift', 0, %s, %s)",
                    (str(subject), now, Jsonb({"by": by})),
                )
        return row is not None

    def immune_events(self, subject: str | None = None) -> list[dict[str, Any]]:
        return self._query(
            "SELECT id, subject, action, tier, at, detail FROM mesh_immune_events "
            "WHERE (%(s)s::text IS NULL OR subject = %(s)s) ORDER BY id",
            {"s": subject},
        )

    def antibodies(self) -> list[Antibody]:
        return [
            Antibody(r["signature"], r["corrective"], r["successes"], r["failures"])
            for r in self._query("SELECT * FROM mesh_antibodies ORDER BY signature, corrective")
        ]

    def record_antibody(self, signature: str, corrective: str, worked: bool, now: datetime) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO mesh_antibodies AS a (signature, corrective, successes, failures, "
                "updated_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (signature, corrective) DO UPDATE "
                "SET successes = a.successes + excluded.successes, "
                "failures = a.failures + excluded.failures, updated_at = excluded.updated_at",
                (signature, corrective, int(worked), int(not worked), now),
            )

    def task_events_after(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        return self._query(
            "SELECT e.id, e.task_id, e.event, e.machine_id, e.at, e.detail, q.task_type, q.error "
            "FROM mesh_task_events e LEFT JOIN mesh_task_queue q ON q.task_id = e.task_id "
            "WHERE e.id > %s ORDER BY e.id LIMIT %s",
            (after_id, limit),
        )

    def event_cursor(self, name: str) -> int:
        rows = self._query("SELECT last_event_id FROM mesh_event_cursor WHERE name = %s", (name,))
        return rows[0]["last_event_id"] if rows else 0

    def requeue_unattempted(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        reason: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        rows = self._query(
            "WITH moved AS (UPDATE mesh_task_queue SET status = 'queued', claimed_by = NULL, "
            "  claimed_at = NULL, progress_at = NULL, pane_id = NULL "
            f"  WHERE task_id = %(id)s AND claimed_by = %(m)s AND status IN {_ACTIVE} "
            "  AND (%(claim)s::integer IS NULL OR claim_seq = %(claim)s) RETURNING task_id, attempts), "
            "logged AS (INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
            "  SELECT task_id, 'queued', %(m)s, %(now)s, jsonb_build_object('reason', 'rate_limited', "
            "  'attempts', attempts, 'message', left(%(msg)s::text, 500)) FROM moved) "
            "SELECT count(*) AS n FROM moved",
            {"id": task_id, "m": machine_id, "claim": claim_seq, "now": now, "msg": reason},
        )
        return rows[0]["n"] == 1

    def record_event(
        self,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        from psycopg.types.json import Jsonb

        with self._tx() as conn:
            conn.execute(
                "INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail) "
                "VALUES (%s, %s, %s, %s, %s)",
                (task_id, event, machine_id, now, Jsonb(detail or {})),
            )

    def record_breaker(
        self, name: str, holder: str, snapshot: dict[str, Any], now: datetime
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO mesh_breaker_state (name, holder, state, failures, opened_at, retry_at, "
                "last_error, updated_at) VALUES (%(name)s, %(holder)s, %(state)s, %(failures)s, "
                "%(opened_at)s, %(retry_at)s, %(last_error)s, %(updated_at)s) "
                "ON CONFLICT (name, holder) DO UPDATE SET state = excluded.state, "
                "failures = excluded.failures, opened_at = excluded.opened_at, "
                "retry_at = excluded.retry_at, last_error = excluded.last_error, "
                "updated_at = excluded.updated_at",
                breaker_row(name, holder, snapshot, now),
            )

    def breaker_rows(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM mesh_breaker_state ORDER BY name, holder")
