"""The immune system's persistence on both mesh backends: states, antibodies, events, cursors
and shared breaker states.

`ImmuneOps` is written once over the mesh backends' primitives (fleet/mesh/sql_store.py) and
is a base of SQLiteMeshStore and PgMeshStore; the statements are the named queries of
fleet/mesh/immune_queries.sql and immune_queries_sqlite.sql. The claim that honours
quarantines and mesh identity is PostgreSQL's `mesh_claim` (supabase/migrations/0003_immune.sql)
and its SQLite twin in sqlite_store.py; the contract tests (tests/mesh/test_immune_store.py)
hold them to the same behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from fleet.mesh.immune import Action, Antibody, ImmunePolicy, Subject, SubjectState, Tier
from fleet.mesh.sql_store import SqlMeshStore, Tx, fence
from fleet.store.timestamps import iso


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _ts(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


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


class ImmuneOps(SqlMeshStore):
    """ImmuneStore over a mesh backend's primitives (fleet/mesh/sql_store.py). The claim that
    honours it is the backend's: PostgreSQL's mesh_claim, SQLite's twin in sqlite_store.py."""

    _immune: Mapping[str, str]  # the backend's named immune queries

    def _immune_rows(self, query: str, /, **params: Any) -> list[Any]:
        return self._query(self._immune[query], params)

    # States --------------------------------------------------------------------------
    def immune_states(self, kind: str | None = None) -> list[SubjectState]:
        return [state_from_row(r) for r in self._immune_rows("immune_states", kind=kind)]

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
                r[key] = self._time(r[key])
        events = [
            self._immune_event(str(a.subject), a.kind, int(a.tier), now, a.detail) for a in actions
        ]

        def work(tx: Tx) -> None:
            tx.executemany("save_immune_state", rows)
            tx.executemany("append_immune_event", events)
            if cursor is not None:
                tx.execute(
                    "move_cursor", name=cursor[0], last_event_id=cursor[1], now=self._time(now)
                )

        self._write(work, self._immune)

    def _immune_event(
        self, subject: str, action: str, tier: int, now: datetime, detail: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "subject": subject,
            "action": action,
            "tier": tier,
            "now": self._time(now),
            "detail": self._json(detail),
        }

    def lift(self, subject: Subject, now: datetime, by: str = "operator") -> bool:
        def work(tx: Tx) -> bool:
            row = tx.find(
                "lift", reason=f"lifted by {by}", now=self._time(now), subject=str(subject)
            )
            if row is not None:
                event = self._immune_event(str(subject), "lift", 0, now, {"by": by})
                tx.execute("append_immune_event", **event)
            return row is not None

        return self._write(work, self._immune)

    def immune_events(self, subject: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "subject": r["subject"],
                "action": r["action"],
                "tier": r["tier"],
                "at": self._col_time(r["at"]),
                "detail": self._col_json(r["detail"]),
            }
            for r in self._immune_rows("immune_events", subject=subject)
        ]

    # Antibodies ----------------------------------------------------------------------
    def antibodies(self) -> list[Antibody]:
        return [
            Antibody(r["signature"], r["corrective"], r["successes"], r["failures"])
            for r in self._immune_rows("antibodies")
        ]

    def record_antibody(self, signature: str, corrective: str, worked: bool, now: datetime) -> None:
        self._write(
            lambda tx: tx.execute(
                "record_antibody",
                signature=signature,
                corrective=corrective,
                successes=int(worked),
                failures=int(not worked),
                now=self._time(now),
            ),
            self._immune,
        )

    # Feed ----------------------------------------------------------------------------
    def task_events_after(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._immune_rows("task_events_after", after_id=after_id, limit=limit)
        return [
            {**dict(r), "at": self._col_time(r["at"]), "detail": self._col_json(r["detail"])}
            for r in rows
        ]

    def event_cursor(self, name: str) -> int:
        rows = self._immune_rows("event_cursor", name=name)
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
        claim = fence(task_id, machine_id, claim_seq)
        return self._fenced("requeue_unattempted", now, claim | {"message": reason}, self._immune)

    def record_event(
        self,
        task_id: str | None,
        event: str,
        machine_id: str | None,
        now: datetime,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self._write(lambda tx: tx.event(task_id, event, machine_id, now, detail))

    # Breakers ------------------------------------------------------------------------
    def record_breaker(
        self, name: str, holder: str, snapshot: dict[str, Any], now: datetime
    ) -> None:
        row = breaker_row(name, holder, snapshot, now)
        for key in ("opened_at", "retry_at", "updated_at"):
            row[key] = self._time(row[key])
        self._write(lambda tx: tx.execute("record_breaker", **row), self._immune)

    def breaker_rows(self) -> list[dict[str, Any]]:
        return [
            {
                **dict(r),
                "opened_at": self._col_time(r["opened_at"]),
                "retry_at": self._col_time(r["retry_at"]),
                "updated_at": self._col_time(r["updated_at"]),
            }
            for r in self._immune_rows("breaker_rows")
        ]
