"""Replays a history through the pure healing rules under a candidate policy and scores it.

The rules decide every action: `fleet.mesh.rules.classify` (orphaned, stuck, machine down),
`confirmation_update`/`confirmed_down` (liveness, two failed confirmations by default) and
`fleet.mesh.immune.observe`/`brake` (quarantines). Time is the history's: the reconciler and
the liveness check run every `RECONCILE_SECONDS` from the history's start. To stay cheap
(a week of a 10-machine mesh, hundreds of candidates), the replay asks the rules only where
they can act: numpy finds the first instant a row *could* be past a threshold (the gaps in its
signs of life), and the rule is asked at that instant; a subject with a clean immune state
and a success is skipped (observe would leave it as it is). tests/tuning check both shortcuts
against the rules asked at every tick.

Scores: MTTR = time from a labelled fault (a hung task, a dead machine, a flaky pane) to the
action that heals it (requeue, down, quarantine); a fault never healed is a miss and counts
as the time left in its window (so misses weigh on MTTR too). A false positive is an action on
something healthy at that moment: a healthy task requeued, a live machine declared down (and
each of its tasks requeued), a healthy subject quarantined. Work lost = claimed time of the
healthy tasks requeued. Replaying one history assumes the candidate's actions do not change
what came after (a requeued task's recorded outcome is still fed to the immune system).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from fleet.mesh import rules
from fleet.mesh.immune import (
    ImmunePolicy,
    Observation,
    Subject,
    SubjectState,
    Tier,
    brake,
    observe,
    probe_claimed,
)
from fleet.mesh.store import MachineHealth, QueuedTask, TaskStatus
from fleet.settings import FleetSettings
from fleet.tuning.genome import GENES, immune_policy, thresholds
from fleet.tuning.history import INF, History, TaskRun

RECONCILE_SECONDS = 60.0  # DESIGN §5: the reconciler (and the liveness check) every 60 s
# The liveness rule's knobs that are not genes: the mesh's defaults (fleet/settings.py).
CONFIRM_SPACING_SECONDS: float = FleetSettings.model_fields[
    "liveness_confirm_spacing_seconds"
].default
# The genes the immune replay reads (its results are cached on them).
IMMUNE_GENES = ("heartbeat_seconds", *(g.name for g in GENES if g.name.startswith("immune_")))
_MIN_STUCK = min(g.low for g in GENES if g.name == "stuck_injection_seconds")
_MIN_ORPHAN = min(g.low for g in GENES if g.name == "orphan_claim_seconds")


def next_tick(t: Any) -> Any:
    """The first reconciler tick strictly after t (ticks at multiples of RECONCILE_SECONDS)."""
    return (np.floor(np.asarray(t) / RECONCILE_SECONDS) + 1) * RECONCILE_SECONDS


@dataclass(frozen=True)
class Decision:
    kind: Literal["requeue", "down", "quarantine"]
    subject: str  # task id, machine id, or immune subject `kind:key`
    at: float
    verdict: str  # rules.Verdict value, "down", or the quarantine tier
    false_positive: bool
    lost: float = 0.0  # seconds of healthy work thrown away


@dataclass(frozen=True)
class Score:
    mttr: float  # mean seconds from fault to healing, over the faults healed
    penalized_mttr: float  # the same with each miss counted as the time left in its window
    false_positives: int
    misses: int
    detected: int
    faults: int
    work_lost: float  # seconds
    decisions: tuple[Decision, ...] = field(default=(), repr=False, compare=False)

    def objectives(self) -> tuple[float, float]:
        return self.penalized_mttr, float(self.false_positives)


def combine(scores: Sequence[Score]) -> Score:
    detected = sum(s.detected for s in scores)
    faults = sum(s.faults for s in scores)
    healed = sum(s.mttr * s.detected for s in scores)
    total = sum(s.penalized_mttr * s.faults for s in scores)
    return Score(
        healed / detected if detected else 0.0,
        total / faults if faults else 0.0,
        sum(s.false_positives for s in scores),
        sum(s.misses for s in scores),
        detected,
        faults,
        sum(s.work_lost for s in scores),
    )


@dataclass
class _Fault:
    onset: float
    end: float
    healed_at: float | None = None


class Prepared:
    """A history with what every candidate needs precomputed (its gaps in signs of life)."""

    def __init__(self, history: History):
        self.history = history
        self.tasks = history.tasks
        self.end = np.array(
            [t.ended_at if t.ended_at is not None else history.horizon for t in history.tasks]
        )
        self.claimed = np.array([t.claimed_at for t in history.tasks])
        self.beats = {m.machine_id: m.heartbeats for m in history.machines}
        self.stuck_segments = self._segments(lambda i, t: (t.claimed_at, *t.progress), _MIN_STUCK)
        self.orphan_segments = self._segments(self._signs_of_life, _MIN_ORPHAN)
        self.observations = self._observations()
        self.subjects = sorted({o[2] for o in self.observations})
        index = {sub: i for i, sub in enumerate(self.subjects)}
        self.subject_index = np.array([index[o[2]] for o in self.observations], dtype=int)
        # Seconds since the subject's previous failure (inf: none yet), per observation.
        last: dict[Subject, float] = {}
        since = np.full(len(self.observations), INF)
        for i, (t, _, sub, outcome, _, _) in enumerate(self.observations):
            if sub in last:
                since[i] = t - last[sub]
            if outcome == "failure":
                last[sub] = t
        self.since_failure = since
        # Seconds to the subject's next failure (inf: none after), per observation.
        following: dict[Subject, float] = {}
        until = np.full(len(self.observations), INF)
        for i in range(len(self.observations) - 1, -1, -1):
            t, _, sub, outcome, _, _ = self.observations[i]
            if sub in following:
                until[i] = following[sub] - t
            if outcome == "failure":
                following[sub] = t
        self.until_failure = until
        self.cache: dict[tuple[Any, ...], Any] = {}  # per-part results by the genes they read
        self.population = {
            "machine": len(history.machines),
            "pane": len({t.pane_subject for t in history.tasks}) or 1,
        }

    def _signs_of_life(self, i: int, task: TaskRun) -> Iterable[float]:
        beats = self.beats.get(task.machine_id, np.empty(0))
        lo, hi = np.searchsorted(beats, [task.claimed_at, self.end[i]])
        return np.union1d(np.concatenate(([task.claimed_at], task.progress)), beats[lo:hi])

    def _segments(self, points, shortest: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(task index, start, end) of every silence longer than any threshold could allow."""
        idx, starts, ends = [], [], []
        for i, task in enumerate(self.tasks):
            p = np.asarray(points(i, task), dtype=float)
            e = np.append(p[1:], self.end[i])
            keep = (e - p) > shortest
            idx.append(np.full(int(keep.sum()), i))
            starts.append(p[keep])
            ends.append(e[keep])
        if not idx:
            return np.empty(0, int), np.empty(0), np.empty(0)
        return np.concatenate(idx), np.concatenate(starts), np.concatenate(ends)

    def _observations(self) -> list[tuple[float, Any, Subject, str, str, str]]:
        """Task outcomes per pane and machine, for subjects that ever fail (one that never fails
        is never quarantined), with their datetimes."""
        obs: list[tuple[float, Any, Subject, str, str, str]] = []
        for t in self.tasks:
            if t.ended_at is None or t.outcome is None:
                continue
            at = self.history.at(t.ended_at)
            for subject in (Subject.pane(t.machine_id, t.pane_id), Subject.machine(t.machine_id)):
                obs.append((t.ended_at, at, subject, t.outcome, t.reason, t.task_id))
        failing = {o[2] for o in obs if o[3] == "failure"}
        return sorted((o for o in obs if o[2] in failing), key=lambda o: (o[0], str(o[2])))


# Liveness -----------------------------------------------------------------------------
def machine_downs(
    history: History,
    machine_id: str,
    heartbeat_seconds: float,
    confirmations: int,
    *,
    missed_heartbeats: float = rules.MISSED_HEARTBEATS,
    spacing_seconds: float = 0.0,
) -> list[tuple[float, float]]:
    """(declared down, next heartbeat) for each time the liveness rule declares the machine down:
    its heartbeat missed (older than `missed_heartbeats` periods) and `confirmations`
    consecutive failed probes — all in one round, `spacing_seconds` apart, as the live
    LivenessProbe takes them when the spacing is set (rules.confirmation_passes)."""
    track = history.machine(machine_id)
    beats = track.heartbeats
    if beats.size == 0:
        return []
    nxt = np.append(beats[1:], INF)
    stale = missed_heartbeats * heartbeat_seconds
    passes = rules.confirmation_passes(confirmations, spacing_seconds)
    downs: list[tuple[float, float]] = []
    for a, b in zip(beats[(nxt - beats) > stale], nxt[(nxt - beats) > stale], strict=True):
        last_hb = history.at(float(a))
        status, count = "alive", 0
        last_tick: float | None = None
        for u0, u1 in track.unreachable:
            lo, hi = max(a + stale, u0), min(b, u1, history.horizon)
            if lo >= hi:
                continue
            t = float(next_tick(lo))
            if last_tick is not None and last_tick + RECONCILE_SECONDS < t:
                # A probe between two unreachable spells succeeded: the count starts again.
                status, count = rules.confirmation_update(status, count, last_hb, False, None)
            down = None
            while t < hi and down is None:
                for k in range(passes):  # one round's probes
                    probe_at = t + k * spacing_seconds
                    if probe_at >= hi:  # it answered (or beat) before this probe
                        break
                    status, count = rules.confirmation_update(
                        status,
                        count,
                        last_hb,
                        True,
                        rules.heartbeat_stale_before(
                            history.at(probe_at), heartbeat_seconds, missed_heartbeats
                        ),
                    )
                    if rules.confirmed_down(count, confirmations):
                        down = probe_at
                        break
                last_tick = t
                t += RECONCILE_SECONDS
            if down is not None:
                downs.append((down, float(b)))
                break
    return downs


# Reconciler ---------------------------------------------------------------------------
def _first_fire(
    segments: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float, n: int
) -> np.ndarray:
    """Per task, the first tick a silence passes `threshold` before it ends (inf: never)."""
    idx, start, end = segments
    fire = next_tick(start + threshold)
    hit = fire < end
    out = np.full(n, INF)
    # Segments are in time order within a task: np.minimum.at keeps the earliest.
    np.minimum.at(out, idx[hit], fire[hit])
    return out


def _last_before(values: Sequence[float] | np.ndarray, t: float) -> float | None:
    arr = np.asarray(values, dtype=float)
    i = int(np.searchsorted(arr, t, side="right"))
    return float(arr[i - 1]) if i else None


def _verdict(
    p: Prepared, i: int, t: float, down: bool, th: rules.Thresholds
) -> rules.Verdict | None:
    """Ask the reconcile rule about task i at tick t, as the store would show it then."""
    h, task = p.history, p.tasks[i]
    progress = _last_before(task.progress, t)
    beat = _last_before(p.beats.get(task.machine_id, ()), t)
    row = QueuedTask(
        task_id=task.task_id,
        kind="replay",
        command=[],
        status=TaskStatus.RUNNING,
        claimed_by=task.machine_id,
        created_at=h.at(task.claimed_at),
        claimed_at=h.at(task.claimed_at),
        progress_at=h.at(progress) if progress is not None else None,
    )
    machines = (
        {}
        if beat is None
        else {
            task.machine_id: MachineHealth(
                machine_id=task.machine_id,
                mesh_id="replay",
                role="worker",
                generation=1,
                last_heartbeat=h.at(beat),
                status="down" if down else "alive",
            )
        }
    )
    return rules.classify(row, machines, h.at(t), th)


def _died(h: History, machine_id: str, t: float) -> bool:
    died = h.machine(machine_id).died_at
    return died is not None and t >= died


# Scoring ------------------------------------------------------------------------------
def score(
    prepared: Prepared, policy: Mapping[str, float], settings: Any, *, exact_immune: bool = False
) -> Score:
    h = prepared.history
    th = thresholds(policy, settings)
    ip = immune_policy(policy, settings)
    decisions: list[Decision] = []
    faults: dict[str, _Fault] = {}
    for task in prepared.tasks:
        if task.hung_at is not None:
            faults[f"task:{task.task_id}"] = _Fault(task.hung_at, INF)
    for ep in h.episodes:
        faults[f"{ep.subject}@{ep.onset}"] = _Fault(ep.onset, ep.end)

    by_subject: dict[str, list[_Fault]] = {}
    for name, f in faults.items():
        by_subject.setdefault(name.split("@")[0], []).append(f)

    def heal(subject: str, t: float) -> bool:
        """Mark the faults of `subject` open at t healed; False when none was open."""
        hit = False
        for f in by_subject.get(subject, ()):
            if f.onset <= t < f.end:
                hit = True
                if f.healed_at is None:
                    f.healed_at = t
        return hit

    # Liveness: machines declared down, and their active claims requeued (mark_down).
    n = len(prepared.tasks)
    down_at = np.full(n, INF)
    downs_of: dict[str, list[tuple[float, float]]] = {}
    for m in h.machines:
        down_key = (
            "down",
            m.machine_id,
            policy["heartbeat_seconds"],
            policy["liveness_confirmations"],
        )
        if down_key not in prepared.cache:
            prepared.cache[down_key] = machine_downs(
                h,
                m.machine_id,
                policy["heartbeat_seconds"],
                int(policy["liveness_confirmations"]),
                missed_heartbeats=rules.MISSED_HEARTBEATS,
                spacing_seconds=CONFIRM_SPACING_SECONDS,
            )
        downs = prepared.cache[down_key]
        downs_of[m.machine_id] = downs
        for t, _ in downs:
            fp = not heal(f"machine:{m.machine_id}", t)
            decisions.append(Decision("down", m.machine_id, t, "down", fp))
    for i, task in enumerate(prepared.tasks):
        for t, _ in downs_of.get(task.machine_id, ()):
            if task.claimed_at < t < prepared.end[i]:
                down_at[i] = t
                break
    stuck = _first_fire(prepared.stuck_segments, th.stuck_seconds, n)
    orphan = _first_fire(prepared.orphan_segments, th.orphan_seconds, n)
    first = np.minimum(np.minimum(stuck, orphan), down_at)
    for i in np.flatnonzero(first < prepared.end).tolist():
        t = float(first[i])
        task = prepared.tasks[i]
        verdict = _verdict(prepared, i, t, down=t >= down_at[i], th=th)
        if verdict is None:
            continue
        real = task.hung_at is not None and t >= task.hung_at
        if real:
            heal(f"task:{task.task_id}", t)
        lost = 0.0 if real else t - task.claimed_at
        decisions.append(Decision("requeue", task.task_id, t, verdict.value, not real, lost))

    immune_key: tuple[Any, ...] = ("immune", exact_immune, *(policy[g] for g in IMMUNE_GENES))
    if immune_key not in prepared.cache:
        if len(prepared.cache) > 4096:
            prepared.cache.clear()
        prepared.cache[immune_key] = _immune(prepared, ip, exact_immune)
    for d in prepared.cache[immune_key]:
        fp = not heal(d.subject, d.at)
        decisions.append(replace(d, false_positive=fp))

    healed = [f.healed_at - f.onset for f in faults.values() if f.healed_at is not None]
    missed = [min(f.end, h.horizon) - f.onset for f in faults.values() if f.healed_at is None]
    total = len(healed) + len(missed)
    return Score(
        mttr=float(np.mean(healed)) if healed else 0.0,
        penalized_mttr=(sum(healed) + sum(missed)) / total if total else 0.0,
        false_positives=sum(1 for d in decisions if d.false_positive),
        misses=len(missed),
        detected=len(healed),
        faults=total,
        work_lost=sum(d.lost for d in decisions),
        decisions=tuple(decisions),
    )


def _immune(p: Prepared, ip: ImmunePolicy, exact: bool) -> list[Decision]:
    """Feed the recorded outcomes through the immune rules; quarantines of tier ≥ 1.

    A success of a subject never quarantined, with no failure within a window before or after
    it, cannot change what `observe` decides (it would only count in a window of no failure),
    so it is skipped; a subject that gets quarantined is replayed again with all its
    observations, until the set of such subjects is stable (then the result is exact).
    """
    obs = p.observations
    window = ip.window.total_seconds()
    n = len(obs)
    success = np.fromiter((o[3] == "success" for o in obs), bool, n)
    since_fail = p.since_failure
    subject_ix = p.subject_index
    dirty = np.zeros(max(1, len(p.subjects)), bool)
    while True:
        keep = (
            np.ones(n, bool)
            if exact
            else ~success | (since_fail <= window) | (p.until_failure <= window) | dirty[subject_ix]
        )
        out, quarantined = _feed(p, ip, np.flatnonzero(keep))
        fresh = [i for i in quarantined if not dirty[i]]
        if exact or not fresh:
            return out
        dirty[fresh] = True


def _feed(p: Prepared, ip: ImmunePolicy, rows: np.ndarray) -> tuple[list[Decision], set[int]]:
    by_kind: dict[str, dict[Subject, SubjectState]] = {"machine": {}, "pane": {}}
    out: list[Decision] = []
    quarantined: set[int] = set()
    obs = p.observations
    for r in rows:
        t, at, subject, outcome, reason, task_id = obs[r]
        states = by_kind[subject.kind]
        state = states.get(subject) or SubjectState(subject)
        if state.excluded(at):
            continue  # the candidate would have given it no work
        if state.probing(at):
            state = probe_claimed(state, task_id)
        population = p.population.get(subject.kind, 1)

        def brake_for(
            tier: Tier,
            subject: Subject = subject,
            states: dict = states,
            at: Any = at,
            population: int = population,
        ) -> Any:
            return brake(subject, tier, states, population, at, ip)

        new, actions = observe(
            state,
            Observation(subject, at, outcome, reason, task_id),
            ip,
            brake_for,
        )
        states[subject] = new
        for a in actions:
            if a.kind == "quarantine" and a.tier >= Tier.SOFT:
                quarantined.add(int(p.subject_index[r]))
                out.append(Decision("quarantine", str(subject), t, str(int(a.tier)), False))
    return out, quarantined


def evaluate(prepared: Sequence[Prepared], policy: Mapping[str, float], settings: Any) -> Score:
    return combine([score(p, policy, settings) for p in prepared])
