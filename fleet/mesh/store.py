"""The mesh's persistence protocol: heartbeats, the task queue, its events and pane state.

Queue lifecycle: queued → claimed → injected → running → done | failed | expired | dead_letter.
Every transition appends a row to mesh_task_events (append-only): the new status as the
event name (detail.reason says why for reconciler moves), plus "Progress", "Handoff",
"ReconcilerRun" and the machine events "MachineDown", "MachineUp", "MachineLeft".
Implementations: SQLite (fleet/mesh/sqlite_store.py, statements in queries_sqlite.sql) and
PostgreSQL (fleet/mesh/pg_store.py, statements in queries.sql, schema in
supabase/migrations/0002_mesh.sql). Pure rules (what is orphaned, stuck, expired, dead) live
in fleet/mesh/rules.py and are applied by the backends as set-based SQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # rules imports this module
    from fleet.mesh.rules import Thresholds

Role = Literal["worker", "planner", "viewer"]
PROTOCOL_GENERATION = 1
SUPPORTED_GENERATIONS = frozenset({1})


class TaskStatus(str, Enum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    INJECTED = "injected"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    DEAD_LETTER = "dead_letter"

    @property
    def active(self) -> bool:
        return self in (TaskStatus.CLAIMED, TaskStatus.INJECTED, TaskStatus.RUNNING)


class MachineIdentity(BaseModel):
    machine_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    mesh_id: str
    generation: int = PROTOCOL_GENERATION
    role: Role = "worker"


class MachineHealth(BaseModel):
    machine_id: str
    mesh_id: str
    role: Role
    generation: int
    last_heartbeat: datetime
    health_url: str | None = None
    active_tasks: list[str] = []
    status: Literal["alive", "suspect", "down", "left"] = "alive"
    failed_confirmations: int = 0


class QueuedTask(BaseModel):
    task_id: str
    kind: str  # task type, e.g. "skill", "review", "hydra", "ship"
    command: list[str]  # argv injected into the pane (joined for the agent)
    target: str | None = None  # machine id, or None for any worker
    model: str | None = None
    status: TaskStatus = TaskStatus.QUEUED
    attempts: int = 0  # failed attempts so far (see fleet/mesh/rules.py)
    claim_seq: int = 0  # bumped by every claim: fences an agent's writes to its claim
    claimed_by: str | None = None
    pane_id: str | None = None
    created_at: datetime
    claimed_at: datetime | None = None
    progress_at: datetime | None = None
    finished_at: datetime | None = None
    output: str | None = None
    error: str | None = None
    checkpoint: str | None = None  # context hand-off notes when requeued at the context budget
    # Immune system and mesh identity (0003_immune.sql): the command family, and the mesh and
    # protocol generation the row belongs to (None = any).
    task_type: str | None = None
    mesh_id: str | None = None
    generation: int | None = None


class TaskEvent(BaseModel):
    task_id: str | None  # None for cycle-level events such as ReconcilerRun
    event: str  # status name, or "ReconcilerRun", "Progress", "Handoff", ...
    machine_id: str | None = None
    at: datetime
    detail: dict[str, Any] = {}


class ReconcileCounts(BaseModel):
    orphaned_requeued: int = 0
    stuck_requeued: int = 0
    expired: int = 0
    dead_lettered: int = 0
    dead_machine_claims_requeued: int = 0  # safety net: active claims of down/left machines


def default_max_attempts() -> int:
    """The failed attempts a task gets when a caller gives none (settings.max_task_attempts)."""
    from fleet.settings import get_settings

    return get_settings().max_task_attempts


def unknown_machine(machine_id: str) -> LookupError:
    return LookupError(f"no heartbeat was ever recorded for machine {machine_id!r}")


@runtime_checkable
class MeshStore(Protocol):
    # Machines --------------------------------------------------------------------
    def heartbeat(
        self,
        identity: MachineIdentity,
        now: datetime,
        health_url: str | None,
        active_tasks: list[str],
    ) -> None:
        """Upsert the machine's row; resets status to alive and failed_confirmations to 0
        (the only way back for a machine declared down)."""

    def leave(self, machine_id: str, now: datetime) -> int:
        """Graceful shutdown: mark the machine left and requeue its active claims (not
        counted as failed attempts); returns how many."""

    def machines(self) -> list[MachineHealth]: ...
    def record_confirmation(
        self, machine_id: str, failed: bool, now: datetime, *, stale_before: datetime | None = None
    ) -> MachineHealth:
        """Liveness: count consecutive failed confirmations; a success resets the count and
        turns suspect back to alive (a down machine stays down until it heartbeats).
        With `stale_before`, a failure is only counted if the last heartbeat is still older
        than it (the machine may have heartbeated while we probed). LookupError if unknown."""

    def mark_down(
        self,
        machine_id: str,
        now: datetime,
        *,
        stale_before: datetime | None = None,
        max_attempts: int | None = None,
    ) -> int:
        """Declare a machine down (after confirmation) and requeue its active claims, each a
        failed attempt (dead-letter past max_attempts; None = settings.max_task_attempts).
        With `stale_before`, refused (returns -1, nothing changed) if it heartbeated since."""

    # Queue -----------------------------------------------------------------------
    def enqueue(
        self,
        kind: str,
        command: list[str],
        now: datetime,
        target: str | None = None,
        model: str | None = None,
        task_id: str | None = None,
        *,
        mesh_id: str | None = None,
        generation: int | None = None,
    ) -> str:
        """Idempotent on task_id when given. With `mesh_id`, only that mesh's machines (of
        `generation`, default this protocol's) claim it."""

    def claim(self, machine_id: str, now: datetime, limit: int = 1) -> list[QueuedTask]:
        """Atomic: two claimers never get the same task; skips tasks targeted elsewhere or of
        another mesh/generation; a machine that never heartbeated, whose row says down/left or
        role viewer gets nothing (until it heartbeats). Honours the immune system: no work
        while hard-quarantined (then one probe), weighted pacing while soft-quarantined,
        quarantined task types skipped (fleet/mesh/immune_store.py)."""

    def transition(
        self,
        task_id: str,
        machine_id: str,
        status: TaskStatus,
        now: datetime,
        *,
        pane_id: str | None = None,
        output: str | None = None,
        error: str | None = None,
        claim_seq: int | None = None,
    ) -> bool:
        """Conditional on claimed_by == machine_id, the task being active and, when given,
        claim_seq being the current claim's (an old attempt of a task the same machine claimed
        again is refused); False otherwise. `status` is injected, running, done or failed
        (ValueError otherwise); counts as progress."""

    def progress(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        note: str | None = None,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        """Pane progress seen: bumps progress_at (conditional like transition); a note is
        recorded as a Progress event."""

    def handoff(
        self,
        task_id: str,
        machine_id: str,
        now: datetime,
        checkpoint: str,
        *,
        claim_seq: int | None = None,
    ) -> bool:
        """Context budget reached: store the checkpoint and requeue (attempt not counted as
        failure); conditional like transition."""

    def get_task(self, task_id: str) -> QueuedTask | None: ...
    def tasks_of(self, machine_id: str) -> list[QueuedTask]:
        """Active tasks claimed by a machine (re-adopted after an agent restart)."""

    def events(self, task_id: str | None = None, *, event: str | None = None) -> list[TaskEvent]:
        """Events in append order, of one task (or all), optionally of one event name."""

    def queue_stats(self, now: datetime) -> dict[str, Any]:
        """{"depth": {status: n for every status}, "oldest_queued_age_seconds": float | None,
        "dead_letter": n}."""

    # Reconciler -------------------------------------------------------------------
    def reconcile(
        self,
        now: datetime,
        *,
        orphan_seconds: float,
        stuck_seconds: float,
        expiry_seconds: float,
        max_attempts: int,
        by_machine: Mapping[str, Thresholds] | None = None,
    ) -> ReconcileCounts:
        """One cycle: set-based statements per rule (fleet/mesh/rules.py), in one
        transaction, plus exactly one ReconcilerRun event carrying the counts. Claims of the
        machines in `by_machine` (a canary policy's) are judged by their orphan and stuck
        thresholds (rules.classify)."""

    # Panes ------------------------------------------------------------------------
    def set_pane_state(
        self,
        machine_id: str,
        pane_id: str,
        now: datetime,
        *,
        task_id: str | None,
        alive: bool,
        context_ratio: float | None = None,
        claim_seq: int | None = None,
    ) -> None:
        """Upsert what a pane shows. The row records the claim of its task (claim_seq, else the
        task's current claim held by machine_id, else None), so a reader acting on a row
        that is seconds old can tell whether the task was claimed again since."""

    def pane_states(self, machine_id: str | None = None) -> list[dict[str, Any]]:
        """Rows of {machine_id, pane_id, task_id, claim_seq, alive, context_ratio, updated_at}."""

    def close(self) -> None:
        """Release the connection or file handle; the store is not used afterwards."""
