"""The healing tuner's deployment: evolve daily (and on anomaly: the immune system's tier 3
"recalibrate"), decide the running canary trial, and start a canary — never a direct apply."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
from prefect import flow, get_run_logger

from fleet.mesh.open import open_mesh_store
from fleet.settings import get_settings
from fleet.tuning.policies import PolicyError, open_policy_store
from fleet.tuning.tuner import gather, judge, parse_since, run_evolve, workers

BY = "flow:healing-tuner"


def tune_once(
    store_url: str,
    *,
    steps: int = 10,
    since: str = "7d",
    seed: int = 0,
    population: int = 20,
    canary_share: float = 0.2,
    start_canary: bool = True,
    min_trial_hours: float = 24.0,
    reason: str = "schedule",
    now: datetime | None = None,
) -> dict[str, Any]:
    """One cycle: decide the running trial; if none runs, evolve and put the best candidate
    (if it beats the current policy without more false positives) on a canary."""
    settings = get_settings()
    now = now or datetime.now(UTC)
    mesh, policies = open_mesh_store(store_url), open_policy_store(store_url)
    verdict = judge(policies, mesh, now=now, by=BY, min_seconds=min_trial_hours * 3600)
    summary: dict[str, Any] = {"reason": reason, "trial": None, "verdict": None, "canary": None}
    if verdict is not None:
        summary.update(trial=verdict.trial.id, verdict=f"{verdict.action}: {verdict.why}")
        if verdict.action == "wait":
            return summary  # one trial at a time
    histories = gather(
        "both",
        mesh_store=mesh,
        since=parse_since(since),
        now=now,
        seed=seed,
        heartbeat_seconds=settings.heartbeat_seconds,
    )
    proposal = run_evolve(
        histories,
        settings,
        steps=steps,
        seed=seed,
        pop_size=population,
        policies=policies,
        by=BY,
        now=now,
    )
    evo = proposal.evolution
    best = evo.best()
    summary.update(
        current_mttr=evo.current.score.penalized_mttr,
        current_false_positives=evo.current.score.false_positives,
        front=len(evo.front),
        seconds=round(evo.seconds, 1),
    )
    if best is None or best.score.penalized_mttr >= evo.current.score.penalized_mttr:
        return summary
    version = next(v for v, c in proposal.versions.items() if c is best)
    summary["best"] = {
        "version": version,
        "mttr": best.score.penalized_mttr,
        "false_positives": best.score.false_positives,
    }
    if start_canary and len(workers(mesh)) >= 2:
        try:
            trial = policies.start_trial(
                version, workers(mesh), canary_share, baseline=_current(settings), by=BY, now=now
            )
        except PolicyError as exc:  # e.g. an anomaly run started a trial meanwhile
            summary["canary"] = {"refused": str(exc)}
            return summary
        summary["canary"] = {"trial": trial.id, "machines": list(trial.machines)}
    return summary


def _current(settings: Any) -> dict[str, float]:
    from fleet.tuning.genome import current_policy

    return current_policy(settings)


@flow(name="healing-tuner", log_prints=False)
async def tune_healing(
    steps: int = 10,
    since: str = "7d",
    seed: int = 0,
    population: int = 20,
    canary_share: float = 0.2,
    start_canary: bool = True,
    reason: str = "schedule",
) -> dict[str, Any]:
    """Daily, or on anomaly (reason="recalibrate: machine:mac3"): decide, evolve, canary."""
    from flows.mesh import mesh_store_url

    url = await mesh_store_url(get_settings())
    summary = await anyio.to_thread.run_sync(
        lambda: tune_once(
            url,
            steps=steps,
            since=since,
            seed=seed,
            population=population,
            canary_share=canary_share,
            start_canary=start_canary,
            reason=reason,
        )
    )
    get_run_logger().info("healing tuner: %s", summary)
    return summary
