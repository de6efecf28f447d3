"""SQLite backend of the Store: one file, safe across threads and processes."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Iterable

from fleet.errors import StaleLease
from fleet.models import EvolutionState, FleetConfig, Stage, Task, Trajectory, check_transition
from fleet.sqlitedb import SQLiteFile
from fleet.store.timestamps import utc

_SCHEMA = resources.files("fleet.store").joinpath("sqlite_schema.sql").read_text()


def _ts(value: datetime | None) -> str | None:
    # One UTC format, so ISO strings compare in time order inside SQL (the format of the
    # files already written: isoformat, not the mesh store's fixed width).
    return utc(value).isoformat() if value else None


class SQLiteStore(SQLiteFile):
    """Store on a SQLite file (WAL); writes that must be atomic take BEGIN IMMEDIATE."""

    what = "SQLite store"

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA)

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO app_evolution_states (app_id, updated_at) VALUES (?, ?) "
                "ON CONFLICT (app_id) DO NOTHING",
                [(app_id, _ts(now)) for app_id in app_ids],
            )

    @staticmethod
    def _state(row: sqlite3.Row) -> EvolutionState:
        return EvolutionState.model_validate(dict(row))

    def get_state(self, app_id: str) -> EvolutionState | None:
        rows = self._query("SELECT * FROM app_evolution_states WHERE app_id = ?", (app_id,))
        return self._state(rows[0]) if rows else None

    def list_states(self) -> list[EvolutionState]:
        return [self._state(r) for r in self._query("SELECT * FROM app_evolution_states ORDER BY app_id")]

    def claim_app(
        self, app_id: str, owner: str, run_id: str, now: datetime, lease_seconds: float,
        steal_from: str | None = None, max_in_flight: int | None = None,
    ) -> int | None:
        until = now + timedelta(seconds=lease_seconds)
        with self._tx() as db:  # BEGIN IMMEDIATE: the count and the claim are one step
            if max_in_flight is not None:
                (in_flight,) = db.execute(
                    "SELECT count(*) FROM app_evolution_states "
                    "WHERE owner IS NOT NULL AND lease_until >= ? AND app_id <> ?",
                    (_ts(now), app_id),
                ).fetchone()
                if in_flight >= max_in_flight:
                    return None
            row = db.execute(
                "UPDATE app_evolution_states SET owner = ?, run_id = ?, lease_until = ?, "
                "epoch = epoch + 1, updated_at = ? "
                "WHERE app_id = ? AND (owner IS NULL OR lease_until < ? OR owner = ?) "
                "RETURNING epoch",
                (owner, run_id, _ts(until), _ts(now), app_id, _ts(now), steal_from),
            ).fetchone()
        return row["epoch"] if row else None

    def release_app(self, app_id: str, epoch: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE app_evolution_states SET owner = NULL, lease_until = NULL "
                "WHERE app_id = ? AND epoch = ?",
                (app_id, epoch),
            )

    def set_stage(
        self, app_id: str, stage: Stage, epoch: int, now: datetime,
        error: str | None = None, lease_seconds: float | None = None,
    ) -> EvolutionState:
        with self._tx() as db:
            row = db.execute(
                "SELECT stage, epoch, owner FROM app_evolution_states WHERE app_id = ?", (app_id,)
            ).fetchone()
            # A released claim (owner NULL) writes nothing either: a worker thread that
            # outlives its run must not move the stage after the run let the app go.
            if row is None or row["epoch"] != epoch or row["owner"] is None:
                current = None if row is None else row["epoch"]
                raise StaleLease(
                    f"stage write for {app_id} refused: epoch {epoch} no longer owns it "
                    f"(current epoch {current}); another run has taken the app or the claim was released"
                )
            current_stage = Stage(row["stage"])
            check_transition(current_stage, stage)
            started = _ts(now) if stage != current_stage else None
            lease = _ts(now + timedelta(seconds=lease_seconds)) if lease_seconds else None
            row = db.execute(
                "UPDATE app_evolution_states SET stage = ?, error = ?, updated_at = ?, "
                "stage_started_at = COALESCE(?, stage_started_at), "
                "lease_until = COALESCE(?, lease_until) "
                "WHERE app_id = ? AND epoch = ? RETURNING *",
                (stage.value, error, _ts(now), started, lease, app_id, epoch),
            ).fetchone()
        return self._state(row)

    def reset_app(self, app_id: str, now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE app_evolution_states SET stage = 'queued', error = NULL, owner = NULL, "
                "lease_until = NULL, stage_started_at = NULL, epoch = epoch + 1, updated_at = ? "
                "WHERE app_id = ?",
                (_ts(now), app_id),
            )

    # Tasks -----------------------------------------------------------------------
    def upsert_tasks(self, tasks: Iterable[Task], now: datetime) -> int:
        rows = {t.key: t for t in tasks}
        if not rows:
            return 0
        with self._tx() as db:
            existing = set()
            keys = list(rows)
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                existing.update(
                    r[0] for r in db.execute(
                        f"SELECT task_key FROM app_evolution_tasks WHERE task_key IN ({marks})", chunk
                    )
                )
            db.executemany(
                "INSERT INTO app_evolution_tasks (task_key, app_id, source, priority, description, "
                "severity, file, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (task_key) DO UPDATE SET priority = excluded.priority, "
                "severity = excluded.severity, updated_at = excluded.updated_at",
                [
                    (k, t.app_id, t.source, t.priority, t.description, t.severity, t.file,
                     _ts(now), _ts(now))
                    for k, t in rows.items()
                ],
            )
        return len(rows) - len(existing)

    def list_tasks(self, app_id: str, source: str | None = None) -> list[Task]:
        sql = "SELECT * FROM app_evolution_tasks WHERE app_id = ?"
        params: tuple = (app_id,)
        if source:
            sql += " AND source = ?"
            params += (source,)
        rows = self._query(sql + " ORDER BY priority, created_at, task_key", params)
        return [
            Task.model_validate(dict(r))  # extra columns (task_key, timestamps) are ignored
            for r in rows
        ]

    # Trajectories ----------------------------------------------------------------
    def record_trajectory(self, trajectory: Trajectory) -> None:
        t = trajectory
        with self._tx() as db:
            db.execute(
                "INSERT INTO trajectories (app_id, run_id, pipeline, skill_tasks, adversarial_issues, "
                "quality_score, outcome, reward, durations, error, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, run_id) DO NOTHING",
                (t.app_id, t.run_id, t.pipeline, t.skill_tasks, t.adversarial_issues,
                 t.quality_score, t.outcome, t.reward, json.dumps(t.durations), t.error,
                 _ts(t.created_at or datetime.now(timezone.utc))),
            )

    def list_trajectories(self, app_id: str) -> list[Trajectory]:
        rows = self._query(
            "SELECT * FROM trajectories WHERE app_id = ? ORDER BY created_at", (app_id,)
        )
        return [Trajectory.model_validate({**dict(r), "durations": json.loads(r["durations"])}) for r in rows]

    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        ids = list(app_ids)
        means: dict[str, float] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._query(
                f"SELECT app_id, AVG(reward) FROM trajectories WHERE app_id IN ({marks}) "
                "GROUP BY app_id",
                tuple(chunk),
            ):
                means[r[0]] = r[1]
        return means

    # Fleet config and cohorts ----------------------------------------------------
    def get_fleet_config(self) -> FleetConfig:
        rows = self._query("SELECT key, value FROM fleet_config")
        return FleetConfig.model_validate({r["key"]: json.loads(r["value"]) for r in rows})

    def set_fleet_config(self, config: FleetConfig) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO fleet_config (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v)) for k, v in config.model_dump().items()],
            )

    def record_cohort(self, run_id: str, app_ids: list[str], now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO cohorts (run_id, app_ids, started_at) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id) DO NOTHING",
                (run_id, json.dumps(app_ids), _ts(now)),
            )

    def finish_cohort(self, run_id: str, now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE cohorts SET finished_at = COALESCE(finished_at, ?) WHERE run_id = ?",
                (_ts(now), run_id),
            )

    def completed_cohorts(self) -> int:
        return self._query(
            "SELECT COUNT(*) FROM cohorts WHERE finished_at IS NOT NULL AND app_ids != '[]'"
        )[0][0]
