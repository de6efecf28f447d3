"""The reconcile and liveness rules as pure functions: thresholds → cutoffs → a verdict per row.

This module is the one Python definition of the rules and of the status sets. The SQL in
supabase/migrations/0002_mesh.sql (mesh_reconcile) and fleet/mesh/queries_sqlite.sql applies
exactly these rules set-based; the tests check the agreement on generated rows, and check
every status list written in the SQL against the sets here. Boundaries are strict: a claim
exactly `orphan_seconds` old is not yet orphaned, one microsecond more and it is.

`attempts` counts failed attempts (a requeue by the reconciler or by a machine being
declared down). A requeue that would make attempts exceed `max_attempts` dead-letters
the task instead. A context hand-off or a graceful leave is not a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from fleet.mesh.store import MachineHealth, QueuedTask, TaskStatus
from fleet.settings import FleetSettings

ACTIVE_STATUSES: tuple[TaskStatus, ...] = (
    TaskStatus.CLAIMED,
    TaskStatus.INJECTED,
    TaskStatus.RUNNING,
)
UNFINISHED_STATUSES: tuple[TaskStatus, ...] = (TaskStatus.QUEUED, *ACTIVE_STATUSES)
FINISHED_STATUSES: tuple[TaskStatus, ...] = (
    TaskStatus.DONE,
    TaskStatus.FAILED,
    TaskStatus.EXPIRED,
    TaskStatus.DEAD_LETTER,
)
# In a pane: their progress is pane output, so the stuck rule watches them.
PANE_STATUSES: tuple[TaskStatus, ...] = (TaskStatus.INJECTED, TaskStatus.RUNNING)
# What an agent may move its own claimed task to (a requeue is handoff's, not transition's).
AGENT_TARGET_STATUSES = frozenset(
    {TaskStatus.INJECTED, TaskStatus.RUNNING, TaskStatus.DONE, TaskStatus.FAILED}
)
# Machines in these states are not routed to and their claims are not theirs any more.
GONE_MACHINE_STATUSES = ("down", "left")


@dataclass(frozen=True)
class Thresholds:
    orphan_seconds: float
    stuck_seconds: float
    expiry_seconds: float
    max_attempts: int

    @classmethod
    def from_settings(cls, settings) -> Thresholds:
        return cls(
            orphan_seconds=settings.orphan_claim_seconds,
            stuck_seconds=settings.stuck_injection_seconds,
            expiry_seconds=settings.task_expiry_seconds,
            max_attempts=settings.max_task_attempts,
        )


@dataclass(frozen=True)
class Cutoffs:
    """A row is past a rule when its timestamp is strictly before the cutoff."""

    orphan: datetime
    stuck: datetime
    expiry: datetime


def cutoffs(now: datetime, t: Thresholds) -> Cutoffs:
    return Cutoffs(
        orphan=now - timedelta(seconds=t.orphan_seconds),
        stuck=now - timedelta(seconds=t.stuck_seconds),
        expiry=now - timedelta(seconds=t.expiry_seconds),
    )


class Verdict(str, Enum):
    """Why the reconciler moves a task; checked in this order, the first that applies wins."""

    EXPIRED = "expired"  # created > expiry ago and not finished → expired
    MACHINE_DOWN = "machine_down"  # active, claimer declared down/left → requeue
    ORPHANED = "orphaned"  # in flight > orphan, claimer silent, no progress → requeue
    STUCK = "stuck"  # injected or running, no pane progress for > stuck → requeue


def claimer_heartbeat_fresh(
    claimed_by: str | None, machines: Mapping[str, MachineHealth], cutoff: datetime
) -> bool:
    health = machines.get(claimed_by) if claimed_by else None
    return (
        health is not None
        and health.status not in GONE_MACHINE_STATUSES
        and health.last_heartbeat >= cutoff
    )


def classify(
    task: QueuedTask,
    machines: Mapping[str, MachineHealth],
    now: datetime,
    t: Thresholds,
    by_machine: Mapping[str, Thresholds] | None = None,
) -> Verdict | None:
    """The reconciler's verdict on one row, or None when the row is left alone.

    `by_machine`: machines on a policy of their own (a canary trial); their claims are
    orphaned and stuck at their thresholds, every other row at `t`'s. Expiry is the task's,
    not a machine's: always `t`'s."""
    if task.status not in UNFINISHED_STATUSES:
        return None
    if task.created_at < cutoffs(now, t).expiry:
        return Verdict.EXPIRED
    if task.status not in ACTIVE_STATUSES:
        return None
    c = cutoffs(now, (by_machine or {}).get(task.claimed_by or "", t))
    claimer = machines.get(task.claimed_by) if task.claimed_by else None
    if claimer is not None and claimer.status in GONE_MACHINE_STATUSES:
        return Verdict.MACHINE_DOWN
    if (
        task.claimed_at is not None
        and task.claimed_at < c.orphan
        and (task.progress_at is None or task.progress_at < c.orphan)
        and not claimer_heartbeat_fresh(task.claimed_by, machines, c.orphan)
    ):
        return Verdict.ORPHANED
    if task.status in PANE_STATUSES:
        last = task.progress_at or task.claimed_at
        if last is not None and last < c.stuck:
            return Verdict.STUCK
    return None


def agent_target(status: TaskStatus | str) -> TaskStatus:
    """`status` if an agent may move its claimed task there (AGENT_TARGET_STATUSES), else
    ValueError: a requeue is handoff's, and the reconciler's moves are not an agent's."""
    status = TaskStatus(status)
    if status not in AGENT_TARGET_STATUSES:
        raise ValueError(
            f"an agent moves a task to injected, running, done or failed, not {status.value!r}; "
            "use handoff() to requeue"
        )
    return status


def requeue_outcome(attempts: int, max_attempts: int) -> tuple[TaskStatus, int]:
    """A failed attempt: back to the queue, or dead-letter once attempts exceed the maximum."""
    attempts += 1
    return (TaskStatus.DEAD_LETTER if attempts > max_attempts else TaskStatus.QUEUED), attempts


def outcome(task: QueuedTask, verdict: Verdict, max_attempts: int) -> tuple[TaskStatus, int]:
    """New (status, attempts) of a row the reconciler acts on."""
    if verdict is Verdict.EXPIRED:
        return TaskStatus.EXPIRED, task.attempts
    return requeue_outcome(task.attempts, max_attempts)


# Liveness ---------------------------------------------------------------------------
# The settings' default (one place): a caller without its own setting judges as the mesh does.
MISSED_HEARTBEATS: float = FleetSettings.model_fields["liveness_missed_heartbeats"].default


def heartbeat_stale_before(
    now: datetime, heartbeat_seconds: float, missed_heartbeats: float = MISSED_HEARTBEATS
) -> datetime:
    """A heartbeat older than `missed_heartbeats` periods is missed (a beat less than half a
    period late is not). Missed is only the trigger to probe: the probe's answer decides."""
    return now - timedelta(seconds=missed_heartbeats * heartbeat_seconds)


def heartbeat_missed(
    health: MachineHealth,
    now: datetime,
    heartbeat_seconds: float,
    missed_heartbeats: float = MISSED_HEARTBEATS,
) -> bool:
    return health.last_heartbeat < heartbeat_stale_before(now, heartbeat_seconds, missed_heartbeats)


def confirmation_passes(required: int, spacing_seconds: float) -> int:
    """Probe passes in one liveness round: all the required confirmations, `spacing_seconds`
    apart, or a single pass (the count then carries over rounds) when spacing is 0."""
    return max(1, required) if spacing_seconds > 0 else 1


def confirmed_down(failed_confirmations: int, required: int) -> bool:
    return failed_confirmations >= max(1, required)


def confirmation_update(
    status: str,
    failed_confirmations: int,
    last_heartbeat: datetime,
    failed: bool,
    stale_before: datetime | None,
) -> tuple[str, int]:
    """New (status, failed_confirmations) after one liveness confirmation.

    A failure counts only while the heartbeat is still missed (it may have arrived while
    we probed); a success resets the count and clears suspicion; down/left machines are
    left as they are — only their own heartbeat brings them back.
    """
    if status in GONE_MACHINE_STATUSES:
        return status, failed_confirmations
    if failed:
        if stale_before is not None and last_heartbeat >= stale_before:
            return status, failed_confirmations
        return "suspect", failed_confirmations + 1
    return "alive", 0
