"""The Store protocol: everything the pipeline persists, whatever the backend."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from fleet.models import EvolutionState, FleetConfig, Stage, Task, Trajectory

EffectKind = Literal["spawn", "dispatch", "ship", "snapshot", "marker"]


class Lease(BaseModel):
    """A named leadership lease (e.g. `planner`); `epoch` is its fencing token."""

    model_config = ConfigDict(frozen=True)

    name: str
    holder: str
    epoch: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime


class Effect(BaseModel):
    """One side effect a run started for an app, recorded before waiting on it."""

    model_config = ConfigDict(frozen=True)

    app_id: str
    key: str
    kind: EffectKind
    value: str  # a gateway task id, or the effect's own small JSON (snapshot, marker)
    epoch: int  # the claim that recorded it (for the record; keys never contain it)
    created_at: datetime


def effect_key(app_id: str, stage: str, attempt: int) -> str:
    """The idempotency key of the effect of `stage` (e.g. "skill", "ship") at `attempt`.

    Derived only from what a resumed run knows again — the app, the stage and the attempt
    number counted from 1 — never from the claim epoch or the run id, so the run that takes
    a dead run's app computes the same key, finds the recorded effect and polls it instead
    of starting it again. Stable across versions: `<stage>/<attempt>/<sha256 prefix>`; the
    hash binds the key to the app when it travels alone (an `Idempotency-Key` header).
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    digest = hashlib.sha256(f"{app_id}\0{stage}\0{attempt}".encode()).hexdigest()[:16]
    return f"{stage}/{attempt}/{digest}"


def task_row(task: Task) -> dict[str, str | int | None]:
    """A task as the columns of its row, keyed by `Task.key` (every backend's upsert)."""
    return {
        "task_key": task.key,
        "app_id": task.app_id,
        "source": task.source,
        "priority": task.priority,
        "description": task.description,
        "severity": task.severity,
        "file": task.file,
    }


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
        self,
        app_id: str,
        owner: str,
        run_id: str,
        now: datetime,
        lease_seconds: float,
        steal_from: str | None = None,
        max_in_flight: int | None = None,
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
        self,
        app_id: str,
        stage: Stage,
        epoch: int,
        now: datetime,
        error: str | None = None,
        lease_seconds: float | None = None,
    ) -> EvolutionState:
        """Move the app to `stage` if `epoch` owns it (else StaleLease), renewing the lease."""

    def renew_claim(self, app_id: str, epoch: int, now: datetime, lease_seconds: float) -> bool:
        """The run's heartbeat: extend the claim to now + lease if `epoch` still holds it.

        False (nothing written) when the claim was released or a newer epoch holds the app:
        the run has lost the app and must stop working on it. Never touches the stage.
        """

    def reset_app(self, app_id: str, now: datetime) -> None:
        """Operator request: back to `queued`, tasks kept, error cleared, claim dropped,
        the app's effects forgotten."""

    # Effects ledger (exactly-once side effects) ----------------------------------
    def record_effect(
        self, app_id: str, key: str, kind: EffectKind, value: str, epoch: int, now: datetime
    ) -> str:
        """Record `value` under (app_id, key) unless a value is there; returns the stored one.

        The first record wins: a retried or resumed run learns the task it already started.
        Fenced like `set_stage`: raises StaleLease when `epoch` no longer holds the app.
        """

    def get_effect(self, app_id: str, key: str) -> Effect | None: ...

    def list_effects(self, app_id: str) -> list[Effect]:
        """The app's effects, oldest first."""

    # Leadership leases -----------------------------------------------------------
    def acquire_lease(
        self, name: str, holder: str, now: datetime, lease_seconds: float
    ) -> int | None:
        """Acquire or renew lease `name`; its epoch, or None while another holder's is live.

        The epoch grows by one whenever the holder changes (a fencing token)."""

    def release_lease(self, name: str, holder: str, epoch: int, now: datetime) -> bool:
        """Give the lease up early; False if `holder` at `epoch` no longer holds it."""

    def get_lease(self, name: str) -> Lease | None:
        """The lease as stored (possibly expired), or None if it was never taken."""

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

    # Cost and work ledger --------------------------------------------------------
    def record_work(self, entry: WorkEntry) -> None:
        """Add one try of an agent task; idempotent on `entry.id`."""

    def work_totals(
        self, by: TotalsBy, since: datetime | None = None, run_id: str | None = None
    ) -> list[WorkTotal]:
        """The ledger summed per app, run or account (recorded at or after `since`, of one
        run only with `run_id`), ordered by key."""

    def open_cohort_spend(self) -> float:
        """Dollars recorded since the last non-empty cohort finished (all, before the first)."""


TotalsBy = Literal["app", "run", "account"]


class WorkEntry(BaseModel):
    """One try of one agent task: how long it took and, if the agent said, what it cost."""

    model_config = ConfigDict(frozen=True)

    id: str  # unique per try: recording it twice adds nothing
    app_id: str
    run_id: str
    stage: str
    task_key: str  # the effect key of (stage, attempt)
    account: str = ""
    outcome: Literal["answered", "failed"]
    wall_seconds: float = Field(ge=0)
    tokens_in: int | None = Field(default=None, ge=0)
    tokens_out: int | None = Field(default=None, ge=0)
    cost_usd: float | None = Field(default=None, ge=0)
    recorded_at: datetime


class WorkTotal(BaseModel):
    """The ledger summed over one app, run or account."""

    model_config = ConfigDict(frozen=True)

    key: str
    tasks: int
    attempts: int
    wall_seconds: float
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None
