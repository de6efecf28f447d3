"""The Store's logic over SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies how one named statement runs and how a timestamp and a JSON value are
written and read back; what its SQL does its own way (PostgreSQL's claim, stage, lease and
effect functions; SQLite's twins of them in Python) stays in the backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fleet.models import EvolutionState, FleetConfig, Task, Trajectory
from fleet.store.base import Effect, Lease, TotalsBy, WorkEntry, WorkTotal


class SqlValues:
    """How a SQL backend writes a timestamp and a JSON value, and reads them back."""

    def _time(self, value: datetime) -> Any:
        """A timestamp as the backend's SQL takes it."""
        raise NotImplementedError

    def _json(self, value: Any) -> Any:
        """A JSON value as the backend's SQL takes it."""
        raise NotImplementedError

    def _col_time(self, value: Any) -> Any:
        """A timestamp column back as an aware datetime (None stays None)."""
        return value

    def _col_json(self, value: Any) -> Any:
        """A JSON column back as Python."""
        return value


class SqlStore(SqlValues):
    """Store reads and plain writes over a backend's primitives (the `# Backend` methods)."""

    # Backend ---------------------------------------------------------------------
    def _rows(self, query: str, /, **params: Any) -> list[Any]:
        """The rows of the named query (dicts or sqlite3.Rows: read by column name)."""
        raise NotImplementedError

    def _write(self, query: str, /, **params: Any) -> None:
        """Run one named statement that writes the same rows if repeated."""
        raise NotImplementedError

    # App states ------------------------------------------------------------------
    def get_state(self, app_id: str) -> EvolutionState | None:
        rows = self._rows("get_state", app_id=app_id)
        return EvolutionState.model_validate(dict(rows[0])) if rows else None

    def list_states(self) -> list[EvolutionState]:
        return [EvolutionState.model_validate(dict(r)) for r in self._rows("list_states")]

    def release_app(self, app_id: str, epoch: int) -> None:
        self._write("release_app", app_id=app_id, epoch=epoch)

    # Effects ledger and leases -----------------------------------------------------
    def get_effect(self, app_id: str, key: str) -> Effect | None:
        rows = self._rows("get_effect", app_id=app_id, key=key)
        return Effect.model_validate(dict(rows[0])) if rows else None

    def list_effects(self, app_id: str) -> list[Effect]:
        return [Effect.model_validate(dict(r)) for r in self._rows("list_effects", app_id=app_id)]

    def get_lease(self, name: str) -> Lease | None:
        rows = self._rows("get_lease", name=name)
        return Lease.model_validate(dict(rows[0])) if rows else None

    # Tasks -----------------------------------------------------------------------
    def list_tasks(self, app_id: str, source: str | None = None) -> list[Task]:
        return [
            Task.model_validate(dict(r))  # extra columns (task_key, timestamps) are ignored
            for r in self._rows("list_tasks", app_id=app_id, source=source or None)
        ]

    # Trajectories ----------------------------------------------------------------
    def record_trajectory(self, trajectory: Trajectory) -> None:
        t = trajectory
        self._write(
            "record_trajectory",
            **t.model_dump(exclude={"durations", "created_at"}),
            durations=self._json(t.durations),
            created_at=self._time(t.created_at or datetime.now(UTC)),
        )

    def list_trajectories(self, app_id: str) -> list[Trajectory]:
        return [
            Trajectory.model_validate({**dict(r), "durations": self._col_json(r["durations"])})
            for r in self._rows("list_trajectories", app_id=app_id)
        ]

    # Fleet config and cohorts ----------------------------------------------------
    def get_fleet_config(self) -> FleetConfig:
        rows = self._rows("get_fleet_config")
        return FleetConfig.model_validate({r["key"]: self._col_json(r["value"]) for r in rows})

    def record_cohort(self, run_id: str, app_ids: list[str], now: datetime) -> None:
        self._write(
            "record_cohort", run_id=run_id, app_ids=self._json(list(app_ids)), now=self._time(now)
        )

    def finish_cohort(self, run_id: str, now: datetime) -> None:
        self._write("finish_cohort", run_id=run_id, now=self._time(now))

    def completed_cohorts(self) -> int:
        return self._rows("completed_cohorts")[0]["n"]

    # Cost and work ledger --------------------------------------------------------
    def record_work(self, entry: WorkEntry) -> None:
        self._write(
            "record_work", **{**entry.model_dump(), "recorded_at": self._time(entry.recorded_at)}
        )

    def work_totals(
        self, by: TotalsBy, since: datetime | None = None, run_id: str | None = None
    ) -> list[WorkTotal]:
        since_at = self._time(since) if since is not None else None
        rows = self._rows("work_totals", by=by, since=since_at, run_id=run_id)
        return [WorkTotal.model_validate(dict(r)) for r in rows]

    def open_cohort_spend(self) -> float:
        return float(self._rows("open_cohort_spend")[0]["spent"])
