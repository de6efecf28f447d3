"""What `fleet ga` and the tuning flow both do: gather histories, evolve, record the candidates,
start a canary, decide a trial on live figures."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fleet.errors import ConfigError
from fleet.tuning import history as hist
from fleet.tuning.genome import current_policy
from fleet.tuning.optimizer import Candidate, Evolution, evolve
from fleet.tuning.policies import PolicyStore, Trial, decide, live_figures

HISTORY_MODES = ("both", "recorded", "synthetic")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `90s` or plain seconds → a window length."""
    m = _DURATION.match(text.lower())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--since {text!r} is not a duration — write e.g. 7d, 12h or 30m")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def gather(
    mode: str,
    *,
    mesh_store: Any,
    since: timedelta,
    now: datetime,
    seed: int,
    heartbeat_seconds: float,
) -> list[hist.History]:
    """The labelled synthetic histories (always: the guard rail's yardstick) plus the recorded
    window, a synthetic 10-machine week, or both."""
    if mode not in HISTORY_MODES:
        raise ConfigError(f"--history {mode!r} is not one of {', '.join(HISTORY_MODES)}")
    histories = hist.labelled_histories(seed)
    labelled = len(histories)
    if mode in ("both", "recorded") and mesh_store is not None:
        recorded = hist.from_store(
            mesh_store, now - since, now, heartbeat_seconds=heartbeat_seconds
        )
        if recorded.tasks:
            histories.append(recorded)
    if mode == "synthetic" or (mode == "both" and len(histories) == labelled):
        histories.append(hist.mesh_week(seed, days=min(7.0, since.total_seconds() / 86400)))
    return histories


def figures(c: Candidate) -> dict[str, Any]:
    s = c.score
    return {
        "mttr_seconds": round(s.penalized_mttr, 1),
        "healed_mttr_seconds": round(s.mttr, 1),
        "false_positives": s.false_positives,
        "misses": s.misses,
        "work_lost_seconds": round(s.work_lost, 1),
        "guard": c.why_not or "passed",
    }


def in_force(policies: PolicyStore | None, settings: Any) -> dict[str, float]:
    """The thresholds the mesh runs: the active policy version's, else the settings model's."""
    base = current_policy(settings)
    active = policies.active() if policies is not None else None
    if active is None:
        return base
    return {name: float(active.genes.get(name, value)) for name, value in base.items()}


@dataclass(frozen=True)
class Proposal:
    evolution: Evolution
    versions: dict[int, Candidate]  # version → candidate, as recorded in the policy store


def run_evolve(
    histories: Sequence[hist.History],
    settings: Any,
    *,
    steps: int,
    seed: int,
    pop_size: int,
    policies: PolicyStore | None,
    by: str,
    now: datetime,
) -> Proposal:
    """Evolve from the policy in force (the active version, else the settings); record the
    offerable front as candidate versions."""
    evo = evolve(
        histories, settings, in_force(policies, settings), steps=steps, seed=seed, pop_size=pop_size
    )
    versions: dict[int, Candidate] = {}
    if policies is not None:
        for c in evo.front:
            v = policies.propose(
                c.policy,
                offerable=c.offerable,
                figures={**figures(c), "seed": seed, "steps": steps},
                by=by,
                now=now,
            )
            versions[v] = c
    return Proposal(evo, versions)


def workers(mesh_store: Any) -> list[str]:
    """Machines that take work now (the canary is drawn from them)."""
    return sorted(
        m.machine_id
        for m in mesh_store.machines()
        if m.role != "viewer" and m.status not in ("down", "left")
    )


@dataclass(frozen=True)
class Verdict:
    trial: Trial
    action: str  # promote | rollback | wait
    why: str
    canary: dict[str, Any]
    control: dict[str, Any]


def judge(
    policies: PolicyStore,
    mesh_store: Any,
    *,
    now: datetime,
    by: str,
    min_seconds: float,
    act: bool = True,
) -> Verdict | None:
    """Compare the running trial's canary and control on live figures; promote or roll back
    (a false-positive regression rolls back whatever the trial's age)."""
    trial = policies.running_trial()
    if trial is None:
        return None
    events = list(hist.events(mesh_store))
    canary_ids = set(trial.machines)
    everyone = {m.machine_id for m in mesh_store.machines()} | canary_ids
    canary = live_figures(events, canary_ids, trial.started_at, now)
    control = live_figures(events, everyone - canary_ids, trial.started_at, now)
    action, why = decide(canary, control, (now - trial.started_at).total_seconds(), min_seconds)
    decision = {"why": why, "canary": vars(canary), "control": vars(control)}
    if act and action == "promote":
        policies.promote(trial.id, by=by, now=now, decision=decision)
    elif act and action == "rollback":
        policies.rollback(by=by, now=now, reason=why)
    return Verdict(trial, action, why, vars(canary), vars(control))
