"""The immune system's persistence on both mesh backends: states, antibodies, events, cursors,
shared breaker states, and the claim that honours quarantines and mesh identity.

Mixed into SQLiteMeshStore and PgMeshStore (their `_tx`/`_query`); the statements are the
named queries of fleet/mesh/immune_queries.sql and immune_queries_sqlite.sql. PostgreSQL's
claim is the `mesh_claim` of supabase/migrations/0003_immune.sql, SQLite's is its twin below,
and the contract tests (tests/mesh/test_immune_store.py) hold them to the same behaviour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from fleet.mesh.immune import Action, Antibody, ImmunePolicy, Subject, SubjectState, Tier
from fleet.mesh.store import QueuedTask
from fleet.store import queries

PG = queries.load("fleet.mesh", "immune_queries.sql")
SQLITE = queries.load("fleet.mesh", "immune_queries_sqlite.sql")
# A task event is the mesh store's own statement (append_event), not a second copy of it.
PG_MESH = queries.load("fleet.mesh", "queries.sql")
SQLITE_MESH = queries.load("fleet.mesh", "queries_sqlite.sql")


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _utc(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")  # type: ignore[union-attr]


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

        machine = f"machine:{machine_id}"
        with self._tx() as db:
            h = db.execute(SQLITE["claimer"], {"machine_id": machine_id}).fetchone()
            if h is None or h["status"] in ("down", "left") or h["role"] == "viewer" or limit <= 0:
                return []
            s = db.execute(SQLITE["immune_state"], {"subject": machine}).fetchone()
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
                    db.execute(SQLITE["set_claim_credit"], {"credit": credit, "subject": machine})
                    return []
            rows = db.execute(
                SQLITE["claim"],
                {
                    "machine_id": machine_id,
                    "now": _ts(now),
                    "mesh_id": h["mesh_id"],
                    "generation": h["generation"],
                    "limit": limit,
                },
            ).fetchall()
            tasks = sorted((_task(r) for r in rows), key=lambda t: (t.created_at, t.task_id))
            db.executemany(
                SQLITE_MESH["append_event"],
                [
                    {
                        "task_id": t.task_id,
                        "event": "claimed",
                        "machine_id": machine_id,
                        "now": _ts(now),
                        "detail": json.dumps({"attempts": t.attempts, "claim_seq": t.claim_seq}),
                    }
                    for t in tasks
                ],
            )
            seen: set[str] = set()
            for t in tasks:  # a due, hard-quarantined task type: this row is its probe
                if t.task_type and t.task_type not in seen:
                    seen.add(t.task_type)
                    db.execute(
                        SQLITE["set_type_probe"],
                        {
                            "task_id": t.task_id,
                            "now": _ts(now),
                            "subject": f"task_type:{t.task_type}",
                        },
                    )
            if probe and tasks:
                db.execute(
                    SQLITE["set_machine_probe"],
                    {"task_id": tasks[0].task_id, "now": _ts(now), "subject": machine},
                )
            elif credit is not None:
                db.execute(
                    SQLITE["set_claim_credit"], {"credit": credit - len(tasks), "subject": machine}
                )
        return tasks

    # States --------------------------------------------------------------------------
    def immune_states(self, kind: str | None = None) -> list[SubjectState]:
        return [state_from_row(r) for r in self._query(SQLITE["immune_states"], {"kind": kind})]

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
            db.executemany(SQLITE["save_immune_state"], rows)
            db.executemany(
                SQLITE["append_immune_event"],
                [
                    {
                        "subject": str(a.subject),
                        "action": a.kind,
                        "tier": int(a.tier),
                        "now": _ts(now),
                        "detail": json.dumps(a.detail),
                    }
                    for a in actions
                ],
            )
            if cursor is not None:
                db.execute(
                    SQLITE["move_cursor"],
                    {"name": cursor[0], "last_event_id": cursor[1], "now": _ts(now)},
                )

    def lift(self, subject: Subject, now: datetime, by: str = "operator") -> bool:
        with self._tx() as db:
            row = db.execute(
                SQLITE["lift"],
                {"reason": f"lifted by {by}", "now": _ts(now), "subject": str(subject)},
            ).fetchone()
            if row is not None:
                db.execute(
                    SQLITE["append_immune_event"],
                    {
                        "subject": str(subject),
                        "action": "lift",
                        "tier": 0,
                        "now": _ts(now),
                        "detail": json.dumps({"by": by}),
                    },
                )
        return row is not None

    def immune_events(self, subject: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "subject": r["subject"],
                "action": r["action"],
                "tier": r["tier"],
                "at": _dt(r["at"]),
                "detail": json.loads(r["detail"]),
            }
            for r in self._query(SQLITE["immune_events"], {"subject": subject})
        ]

    # Antibodies ----------------------------------------------------------------------
    def antibodies(self) -> list[Antibody]:
        return [
            Antibody(r["signature"], r["corrective"], r["successes"], r["failures"])
            for r in self._query(SQLITE["antibodies"])
        ]

    def record_antibody(self, signature: str, corrective: str, worked: bool, now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                SQLITE["record_antibody"],
                {
                    "signature": signature,
                    "corrective": corrective,
                    "successes": int(worked),
                    "failures": int(not worked),
                    "now": _ts(now),
                },
            )

    # Feed ----------------------------------------------------------------------------
    def task_events_after(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._query(SQLITE["task_events_after"], {"after_id": after_id, "limit": limit})
        return [{**dict(r), "at": _dt(r["at"]), "detail": json.loads(r["detail"])} for r in rows]

    def event_cursor(self, name: str) -> int:
        rows = self._query(SQLITE["event_cursor"], {"name": name})
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
                SQLITE["requeue_unattempted"],
                {"task_id": task_id, "machine_id": machine_id, "claim": claim_seq},
            ).fetchone()
            if row is None:
                return False
            detail = {
                "reason": "rate_limited",
                "attempts": row["attempts"],
                "message": reason[:500],
            }
            db.execute(
                SQLITE_MESH["append_event"],
                {
                    "task_id": task_id,
                    "event": "queued",
                    "machine_id": machine_id,
                    "now": _ts(now),
                    "detail": json.dumps(detail),
                },
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
                SQLITE_MESH["append_event"],
                {
                    "task_id": task_id,
                    "event": event,
                    "machine_id": machine_id,
                    "now": _ts(now),
                    "detail": json.dumps(detail or {}),
                },
            )

    # Breakers ------------------------------------------------------------------------
    def record_breaker(
        self, name: str, holder: str, snapshot: dict[str, Any], now: datetime
    ) -> None:
        row = breaker_row(name, holder, snapshot, now)
        for key in ("opened_at", "retry_at", "updated_at"):
            row[key] = _ts(row[key])
        with self._tx() as db:
            db.execute(SQLITE["record_breaker"], row)

    def breaker_rows(self) -> list[dict[str, Any]]:
        return [
            {
                **dict(r),
                "opened_at": _dt(r["opened_at"]),
                "retry_at": _dt(r["retry_at"]),
                "updated_at": _dt(r["updated_at"]),
            }
            for r in self._query(SQLITE["breaker_rows"])
        ]


class PgImmuneOps:
    """ImmuneStore on PostgreSQL; the claim itself is mesh_claim (0003_immune.sql)."""

    _tx: Any
    _query: Any

    def immune_states(self, kind: str | None = None) -> list[SubjectState]:
        return [state_from_row(r) for r in self._query(PG["immune_states"], {"kind": kind})]

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
                cur.executemany(PG["save_immune_state"], rows)
                cur.executemany(
                    PG["append_immune_event"],
                    [
                        {
                            "subject": str(a.subject),
                            "action": a.kind,
                            "tier": int(a.tier),
                            "now": now,
                            "detail": Jsonb(a.detail),
                        }
                        for a in actions
                    ],
                )
            if cursor is not None:
                conn.execute(
                    PG["move_cursor"], {"name": cursor[0], "last_event_id": cursor[1], "now": now}
                )

    def lift(self, subject: Subject, now: datetime, by: str = "operator") -> bool:
        from psycopg.types.json import Jsonb

        with self._tx() as conn:
            row = conn.execute(
                PG["lift"], {"reason": f"lifted by {by}", "now": now, "subject": str(subject)}
            ).fetchone()
            if row is not None:
                conn.execute(
                    PG["append_immune_event"],
                    {
                        "subject": str(subject),
                        "action": "lift",
                        "tier": 0,
                        "now": now,
                        "detail": Jsonb({"by": by}),
                    },
                )
        return row is not None

    def immune_events(self, subject: str | None = None) -> list[dict[str, Any]]:
        return self._query(PG["immune_events"], {"subject": subject})

    def antibodies(self) -> list[Antibody]:
        return [
            Antibody(r["signature"], r["corrective"], r["successes"], r["failures"])
            for r in self._query(PG["antibodies"])
        ]

    def record_antibody(self, signature: str, corrective: str, worked: bool, now: datetime) -> None:
        with self._tx() as conn:
            conn.execute(
                PG["record_antibody"],
                {
                    "signature": signature,
                    "corrective": corrective,
                    "successes": int(worked),
                    "failures": int(not worked),
                    "now": now,
                },
            )

    def task_events_after(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        return self._query(PG["task_events_after"], {"after_id": after_id, "limit": limit})

    def event_cursor(self, name: str) -> int:
        rows = self._query(PG["event_cursor"], {"name": name})
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
            PG["requeue_unattempted"],
            {
                "task_id": task_id,
                "machine_id": machine_id,
                "claim": claim_seq,
                "now": now,
                "message": reason,
            },
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
                PG_MESH["append_event"],
                {
                    "task_id": task_id,
                    "event": event,
                    "machine_id": machine_id,
                    "now": now,
                    "detail": Jsonb(detail or {}),
                },
            )

    def record_breaker(
        self, name: str, holder: str, snapshot: dict[str, Any], now: datetime
    ) -> None:
        with self._tx() as conn:
            conn.execute(PG["record_breaker"], breaker_row(name, holder, snapshot, now))

    def breaker_rows(self) -> list[dict[str, Any]]:
        return self._query(PG["breaker_rows"])
