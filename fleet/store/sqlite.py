"""SQLite backend of the Store: one file, safe across threads and processes.

The statements are the named queries of fleet/store/queries_sqlite.sql.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from fleet.errors import StaleLease
from fleet.models import EvolutionState, FleetConfig, Stage, Task, check_transition
from fleet.sqlitedb import SQLiteFile
from fleet.store import queries
from fleet.store.base import EffectKind, task_row
from fleet.store.sql import SqlStore
from fleet.store.timestamps import utc

_SCHEMA = resources.files("fleet.store").joinpath("sqlite_schema.sql").read_text()
QUERIES = queries.load("fleet.store", "queries_sqlite.sql")


def _ts(value: datetime | None) -> str | None:
    # One UTC format, so ISO strings compare in time order inside SQL (the format of the
    # files already written: isoformat, not the mesh store's fixed width).
    return utc(value).isoformat() if value else None


class SQLiteStore(SQLiteFile, SqlStore):
    """Store on a SQLite file (WAL); writes that must be atomic take BEGIN IMMEDIATE."""

    what = "SQLite store"

    def __init__(self, path: str | Path):
        super().__init__(path, _SCHEMA)

    def _rows(self, query: str, /, **params: Any) -> list[sqlite3.Row]:
        return self._query(QUERIES[query], params)

    def _write(self, query: str, /, **params: Any) -> None:
        with self._tx() as db:
            db.execute(QUERIES[query], params)

    def _time(self, value: datetime) -> str | None:
        return _ts(value)

    def _json(self, value: Any) -> str:
        return json.dumps(value)

    def _col_json(self, value: str) -> Any:
        return json.loads(value)

    def _owned(self, db: sqlite3.Connection, app_id: str, epoch: int, what: str) -> sqlite3.Row:
        """The app's claim row if `epoch` still owns it, else StaleLease (`what` was refused).

        A released claim (owner NULL) owns nothing either: a worker thread that outlives its
        run must not write after the run let the app go."""
        row = db.execute(QUERIES["claim_of"], {"app_id": app_id}).fetchone()
        if row is None or row["epoch"] != epoch or row["owner"] is None:
            current = None if row is None else row["epoch"]
            raise StaleLease(
                f"{what} for {app_id} refused: epoch {epoch} no longer owns it "
                f"(current epoch {current}); another run has taken the app or the claim "
                "was released"
            )
        return row

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        with self._tx() as db:
            db.executemany(
                QUERIES["ensure_app"], [{"app_id": app_id, "now": _ts(now)} for app_id in app_ids]
            )

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
            row = self._owned(db, app_id, epoch, "stage write")
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
        return EvolutionState.model_validate(dict(row))

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
            self._owned(db, app_id, epoch, f"effect {key}")
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
                [task_row(t) | {"now": _ts(now)} for t in rows.values()],
            )
        return len(rows) - len(existing)

    # Trajectories ----------------------------------------------------------------
    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        rows = self._rows("reward_means", app_ids=json.dumps(list(app_ids)))
        return {r["app_id"]: r["reward_mean"] for r in rows}

    # Fleet config and cohorts ----------------------------------------------------
    def set_fleet_config(self, config: FleetConfig) -> None:
        with self._tx() as db:
            db.executemany(
                QUERIES["set_fleet_config"],
                [{"key": k, "value": json.dumps(v)} for k, v in config.model_dump().items()],
            )
