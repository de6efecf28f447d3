"""Feeds the mesh's task events to the immune system: one cycle reads the events since its
cursor, turns them into observations (pure), steps every subject and saves the result.

Event → observation (machine, pane, task type of the row):
  done                                  → success of the claimer, its pane and the task type
  failed                                → failure of the same (a rate-limit message: the task
                                          was not at fault — no failure)
  AntibodyApplied                       → failure of the same, with the learned corrective the
                                          agent applied instead of failing the task (the
                                          subject's next outcome is its verdict)
  queued (orphaned | stuck | machine_down) → failure of the claimer and the task type
  dead_letter                           → failure of the task type
  PaneRespawned                         → failure of the pane (its agent died)
  MachineDown                           → failure of the machine
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet.mesh import immune
from fleet.mesh.immune import Action, ImmunePolicy, Observation, Subject, SubjectState, Tier

CURSOR = "immune"
APPLIED = "AntibodyApplied"  # a node agent applied a learned corrective to a failed task
_REQUEUE_FAILURES = ("orphaned", "stuck", "machine_down")


def observations(rows: Iterable[Mapping[str, Any]]) -> list[Observation]:
    """The observations a batch of mesh_task_events rows (with task_type) amounts to."""
    out: list[Observation] = []
    for r in rows:
        event, at, machine = r["event"], r["at"], r.get("machine_id")
        detail = r.get("detail") or {}
        task_type, task_id = r.get("task_type"), r.get("task_id")
        pane = detail.get("pane_id")
        subjects: list[Subject] = []
        outcome = None
        reason = corrective = ""
        if event in ("done", "failed", APPLIED):
            reason = str(detail.get("error") or r.get("error") or "")
            if event == "failed" and immune.is_rate_limit(reason):
                continue  # the account's backoff is the agent's; the task is not at fault
            outcome = "success" if event == "done" else "failure"
            corrective = str(detail.get("corrective") or "") if event == APPLIED else ""
            subjects = [Subject.machine(machine)] if machine else []
            if machine and pane:
                subjects.append(Subject.pane(machine, pane))
            if task_type:
                subjects.append(Subject.task_type(task_type))
        elif event == "queued" and detail.get("reason") in _REQUEUE_FAILURES:
            outcome, reason = "failure", str(detail["reason"])
            subjects = [Subject.machine(machine)] if machine else []
            if task_type:
                subjects.append(Subject.task_type(task_type))
        elif event == "dead_letter" and task_type:
            outcome, reason = "failure", f"dead letter ({detail.get('reason', '')})"
            subjects = [Subject.task_type(task_type)]
        elif event == "PaneRespawned" and machine and pane:
            outcome, reason = "failure", str(detail.get("note") or "pane agent exited")
            subjects = [Subject.pane(machine, pane)]
        elif event == "MachineDown" and machine:
            outcome, reason = "failure", "machine declared down"
            subjects = [Subject.machine(machine)]
        for subject in subjects:
            out.append(Observation(subject, at, outcome, reason, task_id, corrective))  # type: ignore[arg-type]
    return out


@dataclass
class ImmuneCycle:
    """What one cycle changed."""

    at: datetime
    observed: int = 0
    actions: list[Action] = field(default_factory=list)
    states: dict[Subject, SubjectState] = field(default_factory=dict)

    def quarantined(self) -> list[SubjectState]:
        return sorted(
            (s for s in self.states.values() if s.quarantined(self.at)),
            key=lambda s: str(s.subject),
        )

    def summary(self) -> dict[str, Any]:
        by_tier = {t.name.lower(): 0 for t in Tier if t > Tier.INNATE}
        for s in self.quarantined():
            by_tier[s.tier.name.lower()] += 1
        return {
            "observed": self.observed,
            "quarantined": by_tier,
            "actions": sorted({a.kind for a in self.actions}),
        }


def step(
    states: dict[Subject, SubjectState],
    obs: Iterable[Observation],
    now: datetime,
    policy: ImmunePolicy,
    population: Mapping[str, int],
    antibodies: Iterable[immune.Antibody] = (),
) -> tuple[dict[Subject, SubjectState], list[Action]]:
    """Apply observations in order, then let time pass to `now` (pure)."""
    states = dict(states)
    actions: list[Action] = []

    def brake_for(subject: Subject, at: datetime):  # asked before any new quarantine
        def ask(tier: Tier) -> immune.Brake:
            return immune.brake(subject, tier, states, population.get(subject.kind, 0), at, policy)

        return ask

    for o in obs:
        state = states.get(o.subject) or SubjectState(o.subject)
        state, done = immune.observe(state, o, policy, brake_for(o.subject, o.at), antibodies)
        states[o.subject] = state
        actions += done
    for subject, state in list(states.items()):
        state, done = immune.tick(state, now, policy, brake_for(subject, now))
        states[subject] = state
        actions += done
    return states, actions


def run_cycle(store: Any, now: datetime, policy: ImmunePolicy, *, batch: int = 5000) -> ImmuneCycle:
    """Read events since the cursor, step the subjects, save changed states, events, cursor."""
    cursor = store.event_cursor(CURSOR)
    rows = store.task_events_after(cursor, batch)
    before = {s.subject: s for s in store.immune_states()}
    machines = [
        m for m in store.machines() if m.role != "viewer" and m.status in ("alive", "suspect")
    ]
    population = {"machine": len(machines), "pane": len(store.pane_states())}
    for kind in ("pane", "task_type", "account"):
        population[kind] = max(population.get(kind, 0), sum(1 for s in before if s.kind == kind))
    obs = observations(rows)
    for o in obs:  # subjects seen now count towards their kind's population
        if o.subject.kind != "machine" and o.subject not in before:
            population[o.subject.kind] = population.get(o.subject.kind, 0) + 1
    after, actions = step(before, obs, now, policy, population, store.antibodies())
    for a in actions:  # correctives that worked (or did not), remembered mesh-wide
        if a.kind == "antibody":
            store.record_antibody(
                a.detail["signature"], a.detail["corrective"], a.detail["worked"], now
            )
    changed = [s for subject, s in after.items() if before.get(subject) != s]
    last = rows[-1]["id"] if rows else cursor
    # Correctives are the failures themselves (in mesh_task_events already) and antibody
    # verdicts are counted in mesh_antibodies: neither is logged again.
    logged = [a for a in actions if a.kind not in ("corrective", "antibody")]
    if changed or logged or last != cursor:
        store.save_immune(changed, logged, policy, now, cursor=(CURSOR, last))
    return ImmuneCycle(at=now, observed=len(obs), actions=actions, states=after)
