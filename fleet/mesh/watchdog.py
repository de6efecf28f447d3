"""The mesh watchdog: heartbeat pulse, spawn monitor, infra watchdog, context budget, breakers.

Pure checks pick what needs attention from store rows; `watchdog_cycle` runs them once and
applies the only action the watchdog owns (a context hand-off, which requeues the task with
its checkpoint). Respawning panes is the node agent's job: the report lists them. Each part
runs on its own, so one failing part (the store down, say) is reported, not fatal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from fleet.mesh import rules
from fleet.mesh.immune import ImmunePolicy
from fleet.mesh.immune_feed import run_cycle
from fleet.mesh.liveness import LivenessProbe, LivenessReport
from fleet.mesh.store import MachineHealth, MeshStore

_SEVERITY = {"open": 2, "half_open": 1, "closed": 0}


class PaneRef(BaseModel):
    machine_id: str
    pane_id: str
    task_id: str | None = None
    claim_seq: int | None = None  # the claim of task_id the pane row describes
    context_ratio: float | None = None


class Handoff(BaseModel):
    pane: PaneRef
    # False when the row no longer describes the task's current claim (handed off, requeued or
    # claimed again since it was written): nothing to do.
    requeued: bool


class WatchdogReport(BaseModel):
    at: datetime
    liveness: LivenessReport | None = None
    stale_machines: list[str] = []
    respawn: list[PaneRef] = []
    handoffs: list[Handoff] = []
    queue: dict[str, Any] = {}
    breakers: dict[str, Any] = {}
    # Immune system: subjects in quarantine ({subject, tier, until, probe_task, reason}) and
    # what this cycle decided ({subject, action, tier, detail}).
    # Feedback metabolism of the mesh: {metabolism, fitness, pace_seconds} (pace = when the
    # watchdog should run next, 30 s busy … 300 s quiet).
    metabolism: dict[str, float] = {}
    quarantines: list[dict[str, Any]] = []
    immune_actions: list[dict[str, Any]] = []
    errors: list[str] = []

    def summary(self) -> dict[str, Any]:
        """Flat counts for events, metrics and artifacts."""
        depth = self.queue.get("depth", {})
        return {
            "stale_machines": len(self.stale_machines),
            "declared_down": len(self.liveness.declared_down) if self.liveness else 0,
            "panes_to_respawn": len(self.respawn),
            "handoffs": sum(1 for h in self.handoffs if h.requeued),
            "queued": depth.get("queued", 0),
            "dead_letter": self.queue.get("dead_letter", 0),
            "oldest_queued_age_seconds": self.queue.get("oldest_queued_age_seconds"),
            "open_breakers": sorted(
                name
                for name, b in self.breakers.items()
                if isinstance(b, dict) and b.get("state") not in (None, "closed")
            ),
            "quarantined": len(self.quarantines),
            "metabolism": self.metabolism.get("metabolism"),
            "pace_seconds": self.metabolism.get("pace_seconds"),
            "errors": len(self.errors),
        }


# Pure checks ------------------------------------------------------------------------
def stale_machines(
    machines: Iterable[MachineHealth],
    now: datetime,
    heartbeat_seconds: float,
    missed_heartbeats: float = rules.MISSED_HEARTBEATS,
    by_machine: Mapping[str, float] | None = None,
) -> list[str]:
    """Machines still counted as up whose heartbeat is missed (input to liveness confirmation);
    `by_machine`: the heartbeat intervals of machines on a canary policy of their own."""
    own = by_machine or {}
    return [
        m.machine_id
        for m in machines
        if m.status in ("alive", "suspect")
        and rules.heartbeat_missed(
            m, now, own.get(m.machine_id, heartbeat_seconds), missed_heartbeats
        )
    ]


def panes_to_respawn(panes: Iterable[dict[str, Any]]) -> list[PaneRef]:
    return [
        PaneRef(
            machine_id=p["machine_id"],
            pane_id=p["pane_id"],
            task_id=p.get("task_id"),
            context_ratio=p.get("context_ratio"),
        )
        for p in panes
        if not p["alive"]
    ]


def panes_over_budget(panes: Iterable[dict[str, Any]], ratio: float) -> list[PaneRef]:
    """Live panes working on a task whose context window is at or past the hand-off ratio."""
    return [
        PaneRef(
            machine_id=p["machine_id"],
            pane_id=p["pane_id"],
            task_id=p["task_id"],
            claim_seq=p.get("claim_seq"),
            context_ratio=p["context_ratio"],
        )
        for p in panes
        if p["alive"]
        and p.get("task_id")
        and p.get("context_ratio") is not None
        and p["context_ratio"] >= ratio
    ]


def handoff_checkpoint(pane: PaneRef, ratio: float, now: datetime, last_note: str | None) -> str:
    lines = [
        f"Context budget hand-off at {now.isoformat()}: pane {pane.machine_id}:{pane.pane_id} "
        f"used {pane.context_ratio:.0%} of its context (threshold {ratio:.0%}).",
        "Continue this task in a fresh session from the last recorded progress.",
    ]
    if last_note:
        lines.append(f"Last progress note: {last_note}")
    return "\n".join(lines)


def breaker_snapshot(store: Any = None, now: datetime | None = None) -> dict[str, Any]:
    """Every breaker as the processes that share their states (the store's mesh_breaker_state)
    and this process see it: per name the worst state of any process (an open breaker whose
    retry time has passed counts as half-open), with the holders that reported it."""
    from fleet.clients.breaker import breaker_states

    merged: dict[str, Any] = {
        name: {**snap, "holders": ["this process"]} for name, snap in breaker_states().items()
    }
    rows = store.breaker_rows() if store is not None and hasattr(store, "breaker_rows") else []
    for row in rows:
        state = row["state"]
        if (
            state == "open"
            and now is not None
            and row["retry_at"] is not None
            and row["retry_at"] <= now
        ):
            state = "half_open"
        seen = merged.get(row["name"])
        holders = (seen["holders"] if seen else []) + [row["holder"]]
        if seen is None or _SEVERITY[state] > _SEVERITY.get(seen["state"], 0):
            merged[row["name"]] = {
                "state": state,
                "failures": row["failures"],
                "last_error": row["last_error"],
                "opened_at": row["opened_at"].isoformat() if row["opened_at"] else None,
                "retry_at": row["retry_at"].isoformat() if row["retry_at"] else None,
                "holders": holders,
            }
        else:
            seen["holders"] = holders
    return merged


def mesh_metabolism(store: Any, now: datetime, settings, recent: int = 2000) -> dict[str, float]:
    """Metabolism, fitness and pace from the latest `recent` task events."""
    from fleet.mesh import metabolism

    last = store.event_cursor("immune")
    rows = store.task_events_after(max(0, last - recent), recent)
    signals = metabolism.signals_from_events(rows)
    value = metabolism.metabolism(signals, now)
    return {
        "metabolism": round(value, 4),
        "fitness": round(metabolism.grounded_fitness(signals, now), 4),
        "pace_seconds": metabolism.pace(
            value,
            settings.metabolism_min_interval_seconds,
            settings.metabolism_max_interval_seconds,
        ),
    }


# One cycle --------------------------------------------------------------------------
def watchdog_cycle(
    store: MeshStore, now: datetime, settings, probe: LivenessProbe | None
) -> WatchdogReport:
    report = WatchdogReport(at=now)

    try:  # heartbeat pulse
        report.stale_machines = stale_machines(
            store.machines(),
            now,
            settings.heartbeat_seconds,
            settings.liveness_missed_heartbeats,
            probe.heartbeat_by_machine if probe is not None else None,
        )
        if probe is not None and report.stale_machines:
            report.liveness = probe.confirm(now)
            report.errors.extend(report.liveness.errors)
    except Exception as exc:
        report.errors.append(f"heartbeat pulse: {exc}")

    try:  # spawn monitor and context budget
        panes = store.pane_states()
        report.respawn = panes_to_respawn(panes)
        for pane in panes_over_budget(panes, settings.context_handoff_ratio):
            if pane.task_id is None:  # panes_over_budget keeps only panes with a task
                continue
            notes = [e.detail.get("note") for e in store.events(pane.task_id, event="Progress")]
            checkpoint = handoff_checkpoint(
                pane, settings.context_handoff_ratio, now, notes[-1] if notes else None
            )
            # Pane rows are up to a heartbeat old: act only on the claim the row describes.
            moved = pane.claim_seq is not None and store.handoff(
                pane.task_id, pane.machine_id, now, checkpoint, claim_seq=pane.claim_seq
            )
            report.handoffs.append(Handoff(pane=pane, requeued=moved))
    except Exception as exc:
        report.errors.append(f"panes: {exc}")

    try:  # infra watchdog
        report.queue = store.queue_stats(now)
    except Exception as exc:
        report.errors.append(f"queue stats: {exc}")

    try:
        report.breakers = breaker_snapshot(store, now)
    except Exception as exc:
        report.breakers = breaker_snapshot()  # at least this process's own
        report.errors.append(f"breaker states: {exc}")

    if hasattr(store, "save_immune"):
        try:  # immune system: outcomes since the last cycle → tiers
            cycle = run_cycle(store, now, ImmunePolicy.from_settings(settings))
            report.quarantines = [
                {
                    "subject": str(s.subject),
                    "tier": int(s.tier),
                    "until": s.until.isoformat() if s.until else None,
                    "probe_task": s.probe_task,
                    "reason": s.reason,
                }
                for s in cycle.quarantined()
            ]
            report.immune_actions = [
                {
                    "subject": str(a.subject),
                    "action": a.kind,
                    "tier": int(a.tier),
                    "detail": a.detail,
                }
                for a in cycle.actions
                if a.kind != "corrective"
            ]
        except Exception as exc:
            report.errors.append(f"immune system: {exc}")
        try:  # feedback metabolism over the latest events
            report.metabolism = mesh_metabolism(store, now, settings)
        except Exception as exc:
            report.errors.append(f"metabolism: {exc}")
    return report
