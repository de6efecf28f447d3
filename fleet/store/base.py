"""The Store protocol: everything the pipeline persists, whatever the backend."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable, Protocol, runtime_checkable

from fleet.models import EvolutionState, FleetConfig, Stage, Task, Trajectory


@runtime_checkable
class Store(Protocol):
    """Source of truth for app stages, tasks, trajectories and fleet config.

    Every write may be retried, so every write is idempotent: tasks upsert on their
    stable key, trajectories on (app_id, run_id), stage writes are conditional on the
    claim epoch (a write from a stale claim raises StaleLease).
    """

    # App states and claims -------------------------------------------------------
    def ensure_apps(self, app_ids: Iterable[str], now: datetime) -> None:
        """Create a `queued` state for each app that has none (existing ones untouched)."""

    def get_state(self, app_id: str) -> EvolutionState | None: ...

    def list_states(self) -> list[EvolutionState]: ...

    def claim_app(
        self, app_id: str, owner: str, run_id: str, now: datetime, lease_seconds: float,
        steal_from: str | None = None, max_in_flight: int | None = None,
    ) -> int | None:
        """Atomically take the app for one run; returns the new epoch, or None if held.

        A claim is free when it has no owner, its lease expired, or its owner equals
        `steal_from` (a crashed run on this host, vouched for by the caller). With
        `max_in_flight`, it is also refused while that many other apps hold a live claim:
        the check and the claim are one step, so overlapping runs cannot exceed it.
        """

    def release_app(self, app_id: str, epoch: int) -> None:
        """Drop the claim if `epoch` still owns it."""

    def set_stage(
        self, app_id: str, stage: Stage, epoch: int, now: datetime,
        error: str | None = None, lease_seconds: float | None = None,
    ) -> EvolutionState:
        """Move the app to `stage` if `epoch` owns it (else StaleLease), renewing the lease."""

    def reset_app(self, app_id: str, now: datetime) -> None:
        """Operator request: back to `queued`, tasks kept, error cleared, claim dropped."""

    # Tasks -----------------------------------------------------------------------
    def upsert_tasks(self, tasks: Iterable[Task], now: datetime) -> int:
        """Insert or update by `Task.key`; returns how many keys were new."""

    def list_tasks(self, app_id: str, source: str | None = None) -> list[Task]: ...

    # Trajectories (KARL) ---------------------------------------------------------
    def record_trajectory(self, trajectory: Trajectory) -> None:
        """Idempotent on (app_id, run_id)."""

    def list_trajectories(self, app_id: str) -> list[Trajectory]: ...

    def reward_means(self, app_ids: Iterable[str]) -> dict[str, float]:
        """Mean reward per app that has trajectories; apps without any are absent."""

    # Fleet config and cohorts ----------------------------------------------------
    def get_fleet_config(self) -> FleetConfig: ...

    def set_fleet_config(self, config: FleetConfig) -> None: ...

    def record_cohort(self, run_id: str, app_ids: list[str], now: datetime) -> None: ...

    def finish_cohort(self, run_id: str, now: datetime) -> None: ...

    def completed_cohorts(self) -> int: ...

    def close(self) -> None: ...
