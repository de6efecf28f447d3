"""SQLite backend of the Store: one file, safe across threads and processes.

The statements are the named queries of fleet/store/queries_sqlite.sql.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from fleet.errors import StaleLease
from fleet.models import EvolutionState, FleetConfig, Stage, Task, Trajectory, check_transition
from fleet.sqlitedb import SQLiteFile
from fleet.store import queries
from fleet.store.base import Effect, EffectKind, Lease, TotalsBy, WorkEntry, WorkTotal
from fleet.store.timestamps import utc

_SCHEMA = resources.files("fleet.store").joinpath("sqlite_schema.sql").read_text()
QUERIES = queries.load("fleet.store", "queries_sqlite.sql")


def _ts(value: datetime | None) -> str | None:
    # One UTC format, so ISO strings compare in time order inside SQL (the format of the
    # files already written: isoformat, not the mesh store's fixed width).
    return utc(value).isoformat() if value else None


class SQLiteStore(SQLiteFile):
    """Store on a SQLite file (WAL); writes that must be atomic take BEGIN IMMEDIATE."""

    what = "SQLite store"

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA)

    def _rows(self, query: str, /, **params: Any) -> list[sqlite3.Row]:
        return self._query(QUERIES[query], params)

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        with self._tx() as db:
            db.executemany(
                QUERIES["ensure_app"], [{"app_id": app_id, "now": _ts(now)} for app_id in app_ids]
            )

    @staticmethod
    def _state(row: sqlite3.Row) -> EvolutionState:
        return EvolutionState.model_validate(dict(row))

    def get_state(self, app_id: str) -> EvolutionState | None:
        rows = self._rows("get_state", app_id=app_id)
        return self._state(rows[0]) if rows else None

    def list_states(self) -> list[EvolutionState]:
        return [self._state(r) for r in self._rows("list_states")]

    def claim_app(
        self,
        app_id: str,
        owner: str,
        run_id: str,
        now: datetime,
        lease_seconds: float,
        steal_from: str | None = None,
        max_in_flight: int | None = None,
    ) -> int | None:
        until = now + timedelta(seconds=lease_seconds)
        with self._tx() as db:  # BEGIN IMMEDIATE: the count and the claim are one step
            if max_in_flight is not None:
                in_flight = db.execute(
                    QUERIES["others_in_flight"], {"now": _ts(now), "app_id": app_id}
                ).fetchone()["n"]
                if in_flight >= max_in_flight:
                    return None
            row = db.execute(
                QUERIES["claim_app"],
                {
                    "owner": owner,
                    "run_id": run_id,
                    "until": _ts(until),
                    "now": _ts(now),
                    "app_id": app_id,
                    "steal_from": steal_from,
                },
            ).fetchone()
        return row["epoch"] if row else None

    def release_app(self, app_id: str, epoch: int) -> None:
        with self._tx() as db:
            db.execute(QUERIES["release_app"], {"app_id": app_id, "epoch": epoch})

    def set_stage(
        self,
        app_id: str,
        stage: Stage,
        epoch: int,
        now: datetime,
        error: str | None = None,
        lease_seconds: float | None = None,
    ) -> EvolutionState:
        with self._tx() as db:
            row = db.execute(QUERIES["claim_of"], {"app_id": app_id}).fetchone()
            # A released claim (owner NULL) writes nothing either: a worker thread that
            # outlives its run must not move the stage after the run let the app go.
            if row is None or row["epoch"] != epoch or row["owner"] is None:
                current = None if row is None else row["epoch"]
                raise StaleLease(
                    f"stage write for {app_id} refused: epoch {epoch} no longer owns it "
                    f"(current epoch {current}); another run has taken the app or the claim "
                    "was released"
                )
            current_stage = Stage(row["stage"])
            check_transition(current_stage, stage)
            lease = _ts(now + timedelta(seconds=lease_seconds)) if lease_seconds else None
            row = db.execute(
                QUERIES["set_stage"],
                {
                    "stage": Stage(stage).value,
                    "error": error,
                    "now": _ts(now),
                    "started": _ts(now) if stage != current_stage else None,
                    "lease_until": lease,
                    "app_id": app_id,
                    "epoch": epoch,
                },
            ).fetchone()
        return self._state(row)

    def renew_claim(self, app_id: str, epoch: int, now: datetime, lease_seconds: float) -> bool:
        until = _ts(now + timedelta(seconds=lease_seconds))
        with self._tx() as db:
            row = db.execute(
                QUERIES["renew_claim"], {"app_id": app_id, "epoch": epoch, "until": until}
            ).fetchone()
        return row is not None

    def reset_app(self, app_id: str, now: datetime) -> None:
        with self._tx() as db:
            db.execute(QUERIES["reset_app_effects"], {"app_id": app_id})
            db.execute(QUERIES["reset_app"], {"app_id": app_id, "now": _ts(now)})

    # Effects ledger --------------------------------------------------------------
    def record_effect(
        self, app_id: str, key: str, kind: EffectKind, value: str, epoch: int, now: datetime
    ) -> str:
        with self._tx() as db:  # BEGIN IMMEDIATE: no claim can slip between check and insert
            row = db.execute(QUERIES["claim_of"], {"app_id": app_id}).fetchone()
            if row is None or row["epoch"] != epoch or row["owner"] is None:
                current = None if row is None else row["epoch"]
                raise StaleLease(
                    f"effect {key} for {app_id} refused: epoch {epoch} no longer owns it "
                    f"(current epoch {current}); another run has taken the app or the claim "
                    "was released"
                )
            db.execute(
                QUERIES["record_effect"],
                {
                    "app_id": app_id,
                    "key": key,
                    "kind": kind,
                    "value": value,
                    "epoch": epoch,
                    "now": _ts(now),
                },
            )
            stored = db.execute(QUERIES["get_effect"], {"app_id": app_id, "key": key}).fetchone()
        return stored["value"]

    def get_effect(self, app_id: str, key: str) -> Effect | None:
        rows = self._rows("get_effect", app_id=app_id, key=key)
        return Effect.model_validate(dict(rows[0])) if rows else None

    def list_effects(self, app_id: str) -> list[Effect]:
        return [Effect.model_validate(dict(r)) for r in self._rows("list_effects", app_id=app_id)]

    # Leadership leases -----------------------------------------------------------
    def acquire_lease(
        self, name: str, holder: str, now: datetime, lease_seconds: float
    ) -> int | None:
        with self._tx() as db:
            row = db.execute(
                QUERIES["acquire_lease"],
                {
                    "name": name,
                    "holder": holder,
                    "now": _ts(now),
                    "until": _ts(now + timedelta(seconds=lease_seconds)),
                },
            ).fetchone()
        return row["epoch"] if row else None

    def release_lease(self, name: str, holder: str, epoch: int, now: datetime) -> bool:
        with self._tx() as db:
            row = db.execute(
                QUERIES["release_lease"],
                {
                    "name": name,
                    "holder": holder,
                    "epoch": epoch,
                    "now": _ts(now),
                    "expired": _ts(now - timedelta(microseconds=1)),
                },
            ).fetchone()
        return row is not None

    def get_lease(self, name: str) -> Lease | None:
        rows = self._rows("get_lease", name=name)
        return Lease.model_validate(dict(rows[0])) if rows else None

    # Tasks -----------------------------------------------------------------------
    def upsert_tasks(self, tasks: Iterable[Task], now: datetime) -> int:
        rows = {t.key: t for t in tasks}
        if not rows:
            return 0
        with self._tx() as db:
            known = db.execute(QUERIES["known_task_keys"], {"task_keys": json.dumps(list(rows))})
            existing = {r["task_key"] for r in known}
            db.executemany(
                QUERIES["upsert_task"],
                [
                    {
                        "task_key": k,
                        "app_id": t.app_id,
                        "source": t.source,
                        "priority": t.priority,
                        "description": t.description,
                        "severity": t.severity,
                        "file": t.file,
                        "now": _ts(now),
                    }
                    for k, t in rows.items()
                ],
            )
        return len(rows) - len(existing)

    def list_tasks(self, app_id: str, source: str | None = None) -> list[Task]:
        return [
            Task.model_validate(dict(r))  # extra columns (task_key, timestamps) are ignored
            for r in self._rows("list_tasks", app_id=app_id, source=source or None)
        ]

    # Trajectories ----------------------------------------------------------------
    def record_trajectory(self, trajectory: Trajectory) -> None:
        t = trajectory
        with self._tx() as db:
            db.execute(
                QUERIES["record_trajectory"],
                {
                    "app_id": t.app_id,
                    "run_id": t.run_id,
                    "pipeline": t.pipeline,
                    "skill_tasks": t.skill_tasks,
                    "adversarial_issues": t.adversarial_issues,
                    "quality_score": t.quality_score,
                    "outcome": t.outcome,
                    "reward": t.reward,
                    "durations": json.dumps(t.durations),
                    "error": t.error,
                    "created_at": _ts(t.created_at or datetime.now(UTC)),
                },
            )

    def list_trajectories(self, app_id: str) -> list[Trajectory]:
        return [
            Trajectory.model_validate({**dict(r), "durations": json.loads(r["durations"])})
            for r in self._rows("list_trajectories", app_id=app_id)
        ]

    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        rows = self._rows("reward_means", app_ids=json.dumps(list(app_ids)))
        return {r["app_id"]: r["reward_mean"] for r in rows}

    # Fleet config and cohorts ----------------------------------------------------
    def get_fleet_config(self) -> FleetConfig:
        rows = self._rows("get_fleet_config")
        return FleetConfig.model_validate({r["key"]: json.loads(r["value"]) for r in rows})

    def set_fleet_config(self, config: FleetConfig) -> None:
        with self._tx() as db:
            db.executemany(
                QUERIES["set_fleet_config"],
                [{"key": k, "value": json.dumps(v)} for k, v in config.model_dump().items()],
            )

    def record_cohort(self, run_id: str, app_ids: list[str], now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                QUERIES["record_cohort"],
                {"run_id": run_id, "app_ids": json.dumps(app_ids), "now": _ts(now)},
            )

    def finish_cohort(self, run_id: str, now: datetime) -> None:
        with self._tx() as db:
            db.execute(QUERIES["finish_cohort"], {"run_id": run_id, "now": _ts(now)})

    def completed_cohorts(self) -> int:
        return self._rows("completed_cohorts")[0]["n"]

    # Cost and work ledger --------------------------------------------------------
    def record_work(self, entry: WorkEntry) -> None:
        with self._tx() as db:
            db.execute(
                QUERIES["record_work"],
                {**entry.model_dump(), "recorded_at": _ts(entry.recorded_at)},
            )

    def work_totals(
        self, by: TotalsBy, since: datetime | None = None, run_id: str | None = None
    ) -> list[WorkTotal]:
        rows = self._rows("work_totals", by=by, since=_ts(since), run_id=run_id)
        return [WorkTotal.model_validate(dict(r)) for r in rows]

    def open_cohort_spend(self) -> float:
        return float(self._rows("open_cohort_spend")[0]["spent"])
