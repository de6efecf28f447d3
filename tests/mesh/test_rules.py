"""The pure reconcile and liveness rules: boundaries, precedence, dead-letters, confirmations."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from fleet.mesh import rules
from fleet.mesh.rules import Verdict
from fleet.mesh.store import MachineHealth, QueuedTask, TaskStatus
from fleet.settings import FleetSettings

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
TH = rules.Thresholds.from_settings(FleetSettings())


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def task(
    status: TaskStatus = TaskStatus.CLAIMED,
    *,
    created: float = 60,
    claimed: float | None = None,
    progress: float | None = None,
    claimed_by: str | None = "mac1",
    attempts: int = 0,
) -> QueuedTask:
    active = status in rules.ACTIVE_STATUSES
    return QueuedTask(
        task_id="t",
        kind="skill",
        command=["x"],
        status=status,
        attempts=attempts,
        created_at=ago(created),
        claimed_by=claimed_by if active else None,
        claimed_at=ago(claimed) if claimed is not None else None,
        progress_at=ago(progress) if progress is not None else None,
    )


def machine(
    status: str = "alive", beat: float = 0, machine_id: str = "mac1"
) -> dict[str, MachineHealth]:
    return {
        machine_id: MachineHealth(
            machine_id=machine_id,
            mesh_id="m",
            role="worker",
            generation=1,
            last_heartbeat=ago(beat),
            status=status,
        )
    }


def test_thresholds_come_from_settings():
    assert (TH.orphan_seconds, TH.stuck_seconds, TH.expiry_seconds, TH.max_attempts) == (
        600,
        900,
        86400,
        3,
    )
    c = rules.cutoffs(NOW, TH)
    assert (NOW - c.orphan, NOW - c.stuck, NOW - c.expiry) == (
        timedelta(minutes=10),
        timedelta(minutes=15),
        timedelta(hours=24),
    )


@pytest.mark.parametrize("extra, verdict", [(timedelta(0), None), (US, Verdict.ORPHANED)])
def test_orphan_boundary_is_strict(extra, verdict):
    t = task(claimed=600)
    t.claimed_at -= extra
    silent = machine(beat=600)  # its last heartbeat was at the claim
    silent["mac1"].last_heartbeat -= extra
    assert rules.classify(t, silent, NOW, TH) is verdict


def test_orphan_needs_a_silent_claimer_and_no_progress():
    old = task(claimed=3600)
    assert rules.classify(old, machine(beat=599), NOW, TH) is None  # claimer heartbeats
    assert rules.classify(task(claimed=3600, progress=599), {}, NOW, TH) is None  # task progresses
    assert rules.classify(old, {}, NOW, TH) is Verdict.ORPHANED  # claimer never seen
    assert rules.classify(old, machine(beat=601), NOW, TH) is Verdict.ORPHANED
    assert rules.classify(old, machine("down", beat=0), NOW, TH) is Verdict.MACHINE_DOWN


@pytest.mark.parametrize("extra, verdict", [(0, None), (1e-6, Verdict.STUCK)])
def test_stuck_boundary_is_strict_and_measured_from_the_last_progress(extra, verdict):
    assert (
        rules.classify(
            task(TaskStatus.INJECTED, claimed=3600, progress=900 + extra), machine(), NOW, TH
        )
        is verdict
    )
    # Without any progress, the injection is measured from the claim.
    assert (
        rules.classify(task(TaskStatus.INJECTED, claimed=900 + extra), machine(), NOW, TH)
        is verdict
    )


@pytest.mark.parametrize("status", list(rules.UNFINISHED_STATUSES))
def test_expiry_boundary_is_strict_and_wins_over_requeues(status):
    assert (
        rules.classify(task(status, created=86400, claimed=5000), {}, NOW, TH)
        is not Verdict.EXPIRED
    )
    assert (
        rules.classify(task(status, created=86400 + 1e-6, claimed=5000), {}, NOW, TH)
        is Verdict.EXPIRED
    )


@pytest.mark.parametrize("status", list(rules.FINISHED_STATUSES))
def test_finished_tasks_are_never_touched(status):
    assert rules.classify(task(status, created=10 * 86400), {}, NOW, TH) is None


@pytest.mark.parametrize("status", list(rules.ACTIVE_STATUSES))
def test_every_in_flight_state_is_orphaned_when_its_claimer_is_silent(status):
    t = task(status, claimed=3600, progress=600)
    assert rules.classify(t, machine(beat=600), NOW, TH) is None  # exactly 10 min: not yet
    t.progress_at -= US
    assert rules.classify(t, machine(beat=600 + 1e-6), NOW, TH) is Verdict.ORPHANED
    assert rules.classify(t, machine(beat=599), NOW, TH) is None  # claimer heartbeats
    assert rules.classify(t, machine("left"), NOW, TH) is Verdict.MACHINE_DOWN


@pytest.mark.parametrize("extra, verdict", [(0, None), (1e-6, Verdict.STUCK)])
def test_running_task_without_pane_progress_is_stuck_like_an_injection(extra, verdict):
    running = task(TaskStatus.RUNNING, claimed=10 * 3600, progress=900 + extra)
    assert rules.classify(running, machine(), NOW, TH) is verdict  # its claimer heartbeats
    assert (
        rules.classify(task(TaskStatus.RUNNING, claimed=900 + extra), machine(), NOW, TH) is verdict
    )


def test_requeue_dead_letters_once_attempts_exceed_the_maximum():
    assert [rules.requeue_outcome(a, 3) for a in range(4)] == [
        (TaskStatus.QUEUED, 1),
        (TaskStatus.QUEUED, 2),
        (TaskStatus.QUEUED, 3),
        (TaskStatus.DEAD_LETTER, 4),
    ]
    assert rules.outcome(task(attempts=2), Verdict.EXPIRED, 3) == (TaskStatus.EXPIRED, 2)


def test_heartbeat_is_missed_after_one_and_a_half_periods():
    health = machine(beat=45)["mac1"]
    assert not rules.heartbeat_missed(health, NOW, 30)  # a beat 15 s late is not a miss
    health.last_heartbeat -= US
    assert rules.heartbeat_missed(health, NOW, 30)
    # The threshold is the setting's, and a caller may pass its own.
    assert rules.MISSED_HEARTBEATS == FleetSettings().liveness_missed_heartbeats == 1.5
    assert not rules.heartbeat_missed(health, NOW, 30, missed_heartbeats=2)


def test_one_round_takes_every_confirmation_unless_spacing_is_zero():
    assert rules.confirmation_passes(2, 5.0) == 2
    assert rules.confirmation_passes(3, 0.5) == 3
    assert rules.confirmation_passes(2, 0) == 1  # one a round: the count carries over rounds
    assert rules.confirmation_passes(0, 5.0) == 1


def test_confirmation_update():
    beat = ago(120)
    assert rules.confirmation_update("alive", 0, beat, True, ago(60)) == ("suspect", 1)
    assert rules.confirmation_update("suspect", 1, beat, True, ago(60)) == ("suspect", 2)
    # It heartbeated while we probed: the failure does not count.
    assert rules.confirmation_update("suspect", 1, ago(10), True, ago(60)) == ("suspect", 1)
    assert rules.confirmation_update("suspect", 1, beat, False, None) == ("alive", 0)
    # Only a heartbeat brings a down machine back, not a lucky probe.
    assert rules.confirmation_update("down", 2, beat, False, None) == ("down", 2)
    assert rules.confirmed_down(2, 2) and not rules.confirmed_down(1, 2)


# The SQL against the one definition -------------------------------------------------
_STATUS_LIST = re.compile(r"status\s+(?:NOT\s+)?IN\s*\(([^()]*)\)", re.IGNORECASE)


def _sql_sources() -> dict[str, str]:
    from importlib import resources

    from fleet.store.migrations import migration_files

    mesh = resources.files("fleet.mesh")
    sources = {
        name: mesh.joinpath(name).read_text()
        for name in (
            "queries.sql",
            "queries_sqlite.sql",
            "mesh_schema_sqlite.sql",
            "immune_queries.sql",
            "immune_queries_sqlite.sql",
        )
    }
    sources |= {
        p.name: p.read_text() for p in migration_files() if "mesh" in p.name or "immune" in p.name
    }
    return sources


def test_every_status_list_in_the_sql_is_one_of_the_sets_defined_in_rules():
    machine_statuses = frozenset(MachineHealth.model_fields["status"].annotation.__args__)
    known = {
        frozenset(s.value for s in rules.ACTIVE_STATUSES): "ACTIVE_STATUSES",
        frozenset(s.value for s in rules.UNFINISHED_STATUSES): "UNFINISHED_STATUSES",
        frozenset(s.value for s in rules.PANE_STATUSES): "PANE_STATUSES",
        frozenset(rules.GONE_MACHINE_STATUSES): "GONE_MACHINE_STATUSES",
        frozenset(s.value for s in TaskStatus): "every task status (CHECK)",
        machine_statuses: "every machine status (CHECK)",
    }
    seen: dict[str, set[str]] = {}
    for name, text in _sql_sources().items():
        lists = _STATUS_LIST.findall(text)
        assert lists, f"{name}: no status list found — has the pattern changed?"
        for body in lists:
            values = frozenset(re.findall(r"'([a-z_]+)'", body))
            assert values in known, (
                f"{name}: status list {sorted(values)} is none of the sets in fleet/mesh/rules.py "
                "— name the set there and use it"
            )
            seen.setdefault(name, set()).add(known[values])
    # The queries that move claimed tasks fence on exactly the active set.
    for name in ("queries.sql", "queries_sqlite.sql"):
        assert (
            "ACTIVE_STATUSES" in seen[name]
            and "GONE_MACHINE_STATUSES" in seen["queries_sqlite.sql"]
        )


def test_agent_target_statuses_are_the_active_and_finished_moves_of_a_claim():
    assert {
        TaskStatus.INJECTED,
        TaskStatus.RUNNING,
        TaskStatus.DONE,
        TaskStatus.FAILED,
    } == rules.AGENT_TARGET_STATUSES
    assert not rules.AGENT_TARGET_STATUSES & {TaskStatus.QUEUED, TaskStatus.CLAIMED}
