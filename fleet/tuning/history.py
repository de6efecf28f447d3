"""The replayable history: plain records of what the healing rules decide from, read from the
store or generated (labelled) for tests and the benchmark.

Times are seconds since `History.start` (floats), so the replay can work on arrays; `at()`
turns one back into a datetime for the pure rules. Labels say what was really wrong: a task
`hung_at` a time (its pane stopped, or its machine died), a subject's fault `Episode` (a flaky
pane, a dead machine). A history read from the store carries the labels its recorded policy
inferred (`labelled=False`): good for MTTR, weaker for false positives.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np

Label = Literal["healthy", "slow", "flaky", "dead", "rate_limited"]
LABELS: tuple[Label, ...] = ("healthy", "slow", "flaky", "dead", "rate_limited")
Outcome = Literal["success", "failure", "rate_limited"]
REQUEUE_REASONS = frozenset({"stuck", "orphaned", "machine_down"})
INF = math.inf


@dataclass(frozen=True)
class MachineTrack:
    machine_id: str
    label: Label
    heartbeats: np.ndarray  # sorted heartbeat times
    unreachable: tuple[tuple[float, float], ...] = ()  # a reachability probe fails inside
    died_at: float | None = None


@dataclass(frozen=True)
class TaskRun:
    """One claim of a task by a pane, from claim to its end (None: no end inside the window)."""

    task_id: str
    machine_id: str
    pane_id: str
    claimed_at: float
    progress: tuple[float, ...] = ()  # pane progress times, ascending
    ended_at: float | None = None
    outcome: Outcome | None = None
    reason: str = ""
    hung_at: float | None = None  # label: no progress could come after this (a fault)
    account: str = ""

    @property
    def pane_subject(self) -> str:
        return f"pane:{self.machine_id}/{self.pane_id}"


@dataclass(frozen=True)
class Episode:
    """A labelled fault of a subject (`kind:key`) over [onset, end)."""

    subject: str
    onset: float
    end: float = INF


@dataclass(frozen=True)
class Transition:
    """A quarantine or breaker transition the recorded policy made (kept for reports)."""

    subject: str
    action: str
    tier: int
    at: float


@dataclass(frozen=True)
class History:
    name: str
    start: datetime
    horizon: float
    machines: tuple[MachineTrack, ...]
    tasks: tuple[TaskRun, ...]
    episodes: tuple[Episode, ...] = ()
    labelled: bool = True
    transitions: tuple[Transition, ...] = ()
    breakers: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def at(self, t: float) -> datetime:
        return self.start + timedelta(seconds=t)

    def machine(self, machine_id: str) -> MachineTrack:
        for m in self.machines:
            if m.machine_id == machine_id:
                return m
        raise KeyError(machine_id)


# Synthetic histories ------------------------------------------------------------------
START = datetime(2026, 1, 5, tzinfo=UTC)
HEARTBEAT = 30.0
DAY = 86400.0


def _heartbeats(
    rng: np.random.Generator, horizon: float, label: Label, blips: Iterable[tuple[float, float]]
) -> np.ndarray:
    n = int(math.ceil(horizon / HEARTBEAT))
    beats = np.arange(0.0, horizon, HEARTBEAT)[:n] + rng.uniform(0, 2, size=n)
    if label == "slow":
        # A loaded machine: one beat in ten is late by up to 40 s (never two periods).
        late = rng.random(beats.size) < 0.10
        beats = beats + late * rng.uniform(0, 40, size=beats.size)
    for a, b in blips:
        beats = beats[(beats < a) | (beats > b)]
    return np.sort(beats[beats < horizon])


def _progress(
    rng: np.random.Generator, start: float, end: float, label: Label
) -> tuple[float, ...]:
    """Pane output times in [start, end]: chatty agents, and on slow machines long silent steps
    (an iOS build or a test suite) of 3–8 minutes."""
    out: list[float] = []
    t = start
    while True:
        if label == "slow" and rng.random() < 0.15:
            gap = rng.uniform(180, 480)
        else:
            gap = min(rng.exponential(45), 240)
        t += gap
        if t >= end:
            return tuple(out)
        out.append(round(t, 3))


def _pane_runs(
    rng: np.random.Generator,
    machine_id: str,
    pane_id: str,
    label: Label,
    horizon: float,
    died_at: float | None,
    flaky: list[tuple[float, float]],
    hang_rate: float,
    account: str,
) -> list[TaskRun]:
    runs: list[TaskRun] = []
    t = float(rng.uniform(0, 60))
    end_of_life = died_at if died_at is not None else horizon
    n = 0
    while t < end_of_life:
        n += 1
        task_id = f"{machine_id}-{pane_id}-{n}"
        in_flaky = any(a <= t < b for a, b in flaky)
        long = (30 * 60, 90 * 60) if label == "slow" else (10 * 60, 40 * 60)
        duration = float(rng.uniform(120, 480) if in_flaky else rng.uniform(*long))
        finish = t + duration
        if label == "rate_limited" and rng.random() < 0.15:
            # The account hits its limit: the agent says so and the task goes back unattempted;
            # the pane waits for the reset (the account backs off), then works again.
            stop = t + float(rng.uniform(60, 600))
            if stop >= end_of_life:
                break
            runs.append(
                TaskRun(
                    task_id,
                    machine_id,
                    pane_id,
                    t,
                    _progress(rng, t, stop, label),
                    stop,
                    "rate_limited",
                    "usage limit reached, retry after 1800 seconds",
                    account=account,
                )
            )
            t = stop + float(rng.uniform(1500, 2100))
            continue
        if died_at is not None and finish >= died_at:
            runs.append(
                TaskRun(
                    task_id,
                    machine_id,
                    pane_id,
                    t,
                    _progress(rng, t, died_at, label),
                    hung_at=died_at,
                    account=account,
                )
            )
            break
        if not in_flaky and rng.random() < hang_rate:
            hung = t + float(rng.uniform(60, duration))
            if hung >= horizon:
                break
            runs.append(
                TaskRun(
                    task_id,
                    machine_id,
                    pane_id,
                    t,
                    _progress(rng, t, hung, label),
                    hung_at=hung,
                    account=account,
                )
            )
            t = hung + 3600.0  # someone dealt with the pane under the recorded policy
            continue
        if finish >= horizon:
            runs.append(
                TaskRun(
                    task_id,
                    machine_id,
                    pane_id,
                    t,
                    _progress(rng, t, horizon, label),
                    account=account,
                )
            )
            break
        failed = rng.random() < (0.6 if in_flaky else 0.04)
        runs.append(
            TaskRun(
                task_id,
                machine_id,
                pane_id,
                t,
                _progress(rng, t, finish, label),
                finish,
                "failure" if failed else "success",
                "xcodebuild exited 65" if failed else "",
                account=account,
            )
        )
        t = finish + float(rng.uniform(5, 60))
    return runs


def synthetic(
    labels: Iterable[Label],
    *,
    days: float = 1.0,
    panes: int = 2,
    seed: int = 0,
    hang_rate: float = 0.02,
    name: str = "",
) -> History:
    """A labelled history of a mesh with one machine per label given (deterministic in `seed`).

    healthy: prompt heartbeats, chatty panes, 4 % of tasks fail. slow: late heartbeats, silent
    build steps of 3–8 min, network blips of 90–110 s (missed beats, failed probes). flaky: one
    pane has episodes (2 h a day) where 60 % of its short tasks fail. dead: dies between 20 % and
    80 % of the window and never comes back. rate_limited: its account hits usage limits.
    Everywhere, `hang_rate` of the tasks hang (the pane stops): the faults the stuck rule is for.
    """
    labels = list(labels)
    horizon = days * DAY
    machines: list[MachineTrack] = []
    tasks: list[TaskRun] = []
    episodes: list[Episode] = []
    for i, label in enumerate(labels):
        mid = f"m{i:02d}-{label.replace('_', '-')}"
        mrng = np.random.default_rng([seed, i])
        blips: list[tuple[float, float]] = []
        if label == "slow":
            for day in range(int(math.ceil(days))):
                for _ in range(3):
                    a = day * DAY + float(mrng.uniform(0, DAY - 200))
                    blips.append((a, a + float(mrng.uniform(90, 110))))
            blips = [(a, b) for a, b in sorted(blips) if b < horizon]
        died_at = float(mrng.uniform(0.2, 0.8) * horizon) if label == "dead" else None
        beats = _heartbeats(mrng, horizon, label, blips)
        unreachable = list(blips)
        if died_at is not None:
            beats = beats[beats < died_at]
            unreachable.append((died_at, INF))
            episodes.append(Episode(f"machine:{mid}", died_at))
        machines.append(MachineTrack(mid, label, beats, tuple(unreachable), died_at))
        for p in range(panes):
            pane = f"%{p}"
            flaky: list[tuple[float, float]] = []
            if label == "flaky" and p == 0:
                for day in range(int(math.ceil(days))):
                    a = day * DAY + float(mrng.uniform(0, DAY - 7200))
                    if a + 7200 <= horizon:
                        flaky.append((a, a + 7200))
                episodes.extend(Episode(f"pane:{mid}/{pane}", a, b) for a, b in flaky)
            tasks.extend(
                _pane_runs(
                    mrng,
                    mid,
                    pane,
                    label,
                    horizon,
                    died_at,
                    flaky,
                    hang_rate,
                    account=f"acct-{mid}",
                )
            )
    return History(
        name or "+".join(labels), START, horizon, tuple(machines), tuple(tasks), tuple(episodes)
    )


def labelled_histories(seed: int = 0, days: float = 1.0) -> list[History]:
    """One small labelled history per failure kind, each with healthy peers (the guard rail's
    yardstick: no candidate may add a false positive on any of them)."""
    kinds: list[tuple[str, list[Label]]] = [
        ("healthy-slow", ["healthy", "slow", "slow", "healthy"]),
        ("flaky", ["healthy", "flaky", "healthy", "healthy"]),
        ("dead", ["healthy", "dead", "healthy", "slow"]),
        ("rate-limited", ["healthy", "rate_limited", "rate_limited", "healthy"]),
    ]
    return [
        synthetic(labels, days=days, seed=seed * 100 + i, name=name)
        for i, (name, labels) in enumerate(kinds)
    ]


def mesh_week(seed: int = 0, machines: int = 10, days: float = 7.0) -> History:
    """A 10-machine mesh over a week: mostly healthy; slow, flaky, dead and rate-limited ones."""
    mix: list[Label] = ["slow", "flaky", "dead", "rate_limited", "slow"]
    labels = [mix[i] if i < len(mix) else "healthy" for i in range(machines)]
    return synthetic(labels, days=days, seed=seed, name=f"mesh-{machines}x{days:g}d")


# Recorded history ---------------------------------------------------------------------
def events(store: Any, page: int = 5000) -> Iterator[dict[str, Any]]:
    after = 0
    while True:
        rows = store.task_events_after(after, page)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1]["id"]


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def from_store(
    store: Any,
    since: datetime,
    now: datetime,
    *,
    heartbeat_seconds: float = HEARTBEAT,
    name: str = "recorded",
) -> History:
    """The window [since, now] as the store recorded it (mesh_task_events, mesh_health, the
    heartbeat log of 0008, the immune events and breaker rows of 0003).

    Heartbeats are the logged ones (the store keeps 8 days of them). Where the log has none —
    a store older than the log, or the time before its first entry — they are rebuilt: one
    every `heartbeat_seconds` while the machine was up (between its MachineDown and MachineUp
    events none, and it was unreachable). Labels are those the recorded policy inferred: a run
    the reconciler requeued (stuck, orphaned, machine down) hung at its last progress.
    """
    horizon = max(0.0, (now - since).total_seconds())

    def rel(value: Any) -> float:
        return (_aware(value) - since).total_seconds()

    runs: dict[str, dict[str, Any]] = {}
    done: list[TaskRun] = []
    downs: dict[str, list[list[float]]] = defaultdict(list)
    first_seen: dict[str, float] = {}

    def close(
        task_id: str, ended: float | None, outcome: Outcome | None, reason: str, hung: float | None
    ) -> None:
        run = runs.pop(task_id, None)
        if run is not None:
            done.append(
                TaskRun(
                    task_id,
                    run["machine"],
                    run["pane"],
                    run["claimed"],
                    tuple(run["progress"]),
                    ended,
                    outcome,
                    reason,
                    hung,
                )
            )

    from fleet.mesh.immune import is_rate_limit

    for e in events(store):
        t = rel(e["at"])
        if t < 0 or t > horizon:
            continue
        machine = e.get("machine_id")
        if machine:
            first_seen.setdefault(machine, t)
        event, task_id, detail = e["event"], e.get("task_id"), e.get("detail") or {}
        if event == "MachineDown" and machine:
            downs[machine].append([t, INF])
        elif event == "MachineUp" and machine and downs[machine]:
            downs[machine][-1][1] = t
        if task_id is None:
            continue
        if event == "claimed" and machine:
            close(task_id, t, None, "reclaimed", None)
            runs[task_id] = {
                "machine": machine,
                "pane": str(detail.get("pane_id") or "main"),
                "claimed": t,
                "progress": [],
            }
        elif event in ("injected", "running", "Progress") and task_id in runs:
            runs[task_id]["progress"].append(t)
        elif event in ("done", "failed") and task_id in runs:
            error = e.get("error") or ""
            outcome: Outcome = (
                "success"
                if event == "done"
                else ("rate_limited" if is_rate_limit(error) else "failure")
            )
            close(task_id, t, outcome, error, None)
        elif event in ("queued", "dead_letter") and task_id in runs:
            reason = str(detail.get("reason") or "")
            run = runs[task_id]
            if reason in REQUEUE_REASONS:
                last = (run["progress"] or [run["claimed"]])[-1]
                close(task_id, None, None, reason, last)
            elif is_rate_limit(reason):
                close(task_id, t, "rate_limited", reason, None)
            else:
                close(task_id, t, None, reason or "requeued", None)
    for task_id in list(runs):
        close(task_id, None, None, "", None)

    logged = store.heartbeat_log(since, now) if hasattr(store, "heartbeat_log") else {}
    machines: list[MachineTrack] = []
    for m in store.machines():
        last = min(rel(m.last_heartbeat), horizon)
        begin = max(0.0, first_seen.get(m.machine_id, 0.0))
        real = np.array([rel(t) for t in logged.get(m.machine_id, ())])
        # Rebuilt up to the log's first entry (more than a missed-beat rule away), else to the end.
        until = real[0] - 2 * heartbeat_seconds if real.size else last
        beats = np.arange(begin, until + 1e-9, heartbeat_seconds) if until >= begin else real[:0]
        gaps = [(a, b) for a, b in downs.get(m.machine_id, [])]
        for a, b in gaps:
            beats = beats[(beats < a - 2 * heartbeat_seconds) | (beats >= b)]
        beats = np.concatenate([beats, real])
        if m.status in ("down", "left") and not gaps:
            gaps.append((last, INF))
        machines.append(MachineTrack(m.machine_id, "healthy", beats, tuple(gaps)))
    transitions = tuple(
        Transition(str(ev["subject"]), str(ev["action"]), int(ev["tier"]), rel(ev["at"]))
        for ev in store.immune_events()
        if 0 <= rel(ev["at"]) <= horizon
    )
    return History(
        name,
        since,
        horizon,
        tuple(machines),
        tuple(done),
        (),
        labelled=False,
        transitions=transitions,
        breakers=tuple(store.breaker_rows()),
    )
