"""The mesh's deployments: the reconciler (every 60 s) and the watchdog, one cycle per run."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

import anyio
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from fleet import events
from fleet.clock import SystemClock
from fleet.mesh.liveness import LivenessProbe
from fleet.mesh.open import mesh_store_url as open_mesh_url
from fleet.mesh.open import open_mesh_store
from fleet.mesh.store import MeshStore, ReconcileCounts
from fleet.mesh.watchdog import WatchdogReport, watchdog_cycle
from fleet.settings import get_settings
from fleet.tuning import anomaly
from fleet.tuning.policies import (
    PoliciesInForce,
    PolicyStore,
    policy_store_beside,
    read_in_force,
)


async def mesh_store_url(settings) -> str:
    """The store the mesh flows work on: the store Block's database when one is configured."""
    from flows.config import _load_block

    return await anyio.to_thread.run_sync(open_mesh_url, settings, _load_block)


def reconcile_cycle(
    store: MeshStore, policies: PolicyStore | None, settings, now: datetime
) -> ReconcileCounts:
    """One reconcile at `now`, each claim judged by its claimer's policy: a canary machine's
    candidate, else the policy in force, else the settings (read once, here)."""
    default, by_machine = read_in_force(policies).reconcile_thresholds(settings)
    return store.reconcile(now, **asdict(default), by_machine=by_machine)


@flow(name="mesh-reconciler", persist_result=False)
async def reconciler(store_url: str | None = None) -> ReconcileCounts:
    """One reconciler cycle: orphaned claims, stuck panes, expiry, dead letters."""
    settings = get_settings()
    store = open_mesh_store(store_url or await mesh_store_url(settings))
    policies = policy_store_beside(store)
    try:
        counts = await anyio.to_thread.run_sync(
            lambda: reconcile_cycle(store, policies, settings, SystemClock().now())
        )
        dead = []
        if counts.dead_lettered:  # this cycle's are the newest `dead_letter` events
            letters = await anyio.to_thread.run_sync(lambda: store.events(event="dead_letter"))
            dead = letters[-counts.dead_lettered :]
    finally:
        store.close()
        if policies is not None:
            policies.close()
    get_run_logger().info("reconciler run on %r: %s", store, counts.model_dump())
    events.reconciler_run(counts.model_dump())
    for letter in dead:  # one event per task: the `task dead-lettered` automation's trigger
        events.task_dead_lettered(
            letter.task_id or "?",
            attempts=int(letter.detail.get("attempts", 0) or 0),
            reason=str(letter.detail.get("reason") or letter.detail.get("rule") or "dead letter"),
            machine_id=letter.machine_id,
        )
    await acreate_table_artifact(
        key="mesh-reconciler",
        table=[{"rule": rule, "tasks": n} for rule, n in counts.model_dump().items()],
        description="Tasks moved by the last reconciler cycle, per rule",
    )
    return counts


def watchdog_probe(
    store: MeshStore, in_force: PoliciesInForce, settings, **overrides: Any
) -> LivenessProbe:
    """The liveness probe under the policies in force: each canary machine's heartbeats and
    confirmations judged by its candidate, the others' by the policy in force."""
    heartbeats, confirmations = in_force.liveness_by_machine(settings)
    return LivenessProbe.from_settings(
        store,
        in_force.settings_for(settings),
        heartbeat_by_machine=heartbeats,
        confirmations_by_machine=confirmations,
        **overrides,
    )


@flow(name="mesh-watchdog", persist_result=False)
async def watchdog(store_url: str | None = None) -> WatchdogReport:
    """One watchdog cycle: heartbeats, liveness, dead panes, context budget, queue, breakers."""
    settings = get_settings()
    logger = get_run_logger()
    store = open_mesh_store(store_url or await mesh_store_url(settings))
    policies = policy_store_beside(store)
    in_force = await anyio.to_thread.run_sync(read_in_force, policies)
    probe = watchdog_probe(store, in_force, settings)
    try:
        # The immune tiers and the default heartbeat are the mesh-wide policy's.
        report = await anyio.to_thread.run_sync(
            lambda: watchdog_cycle(
                store, SystemClock().now(), in_force.settings_for(settings), probe
            )
        )
    finally:
        probe.close()
        store.close()
        if policies is not None:
            policies.close()
    summary = report.summary()
    logger.info("watchdog run on %r: %s", store, summary)
    for error in report.errors:
        logger.warning("watchdog: %s", error)
    events.watchdog_run(summary)
    checked = report.liveness.checked if report.liveness else []
    for machine_id in report.liveness.declared_down if report.liveness else []:
        events.machine_down(
            machine_id,
            reason="missed heartbeats and two failed confirmations",
            requeued=next(v.requeued for v in checked if v.machine_id == machine_id),
        )
    for action in report.immune_actions:
        events.immune_action(
            action["action"], action["subject"], tier=action["tier"], detail=action["detail"]
        )
    anomaly.announce(report.immune_actions)  # tier 3 "recalibrate" runs the healing tuner
    for name in summary["open_breakers"]:
        state = report.breakers[name]
        events.breaker_opened(
            name,
            failures=state.get("failures"),
            reason=state.get("last_error") or state.get("reason"),
        )
    await acreate_markdown_artifact(
        key="mesh-watchdog",
        markdown=_markdown(report, summary),
        description="Mesh health at the last watchdog cycle",
    )
    return report


def _markdown(report: WatchdogReport, summary: dict[str, Any]) -> str:
    lines = [
        f"# Mesh watchdog — {report.at:%Y-%m-%d %H:%M:%S} UTC",
        "",
        "| check | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    if report.liveness and report.liveness.checked:
        lines += [
            "",
            "## Liveness",
            "",
            "| machine | outcome | failed confirmations |",
            "|---|---|---|",
        ]
        lines += [
            f"| {v.machine_id} | {v.outcome} | {v.failed_confirmations} |"
            for v in report.liveness.checked
        ]
    if report.respawn:
        lines += ["", "## Panes to respawn", ""]
        lines += [f"- {p.machine_id}:{p.pane_id} (task {p.task_id or '—'})" for p in report.respawn]
    if report.handoffs:
        lines += ["", "## Context hand-offs", ""]
        lines += [
            f"- {h.pane.task_id} from {h.pane.machine_id}:{h.pane.pane_id} at "
            f"{h.pane.context_ratio:.0%} — {'requeued' if h.requeued else 'no longer claimed'}"
            for h in report.handoffs
        ]
    if report.metabolism:
        m = report.metabolism
        lines += [
            "",
            f"Metabolism {m['metabolism']:.2f} · fitness {m['fitness']:.2f} · "
            f"next watchdog pace {m['pace_seconds']:.0f} s",
        ]
    if report.quarantines:
        lines += [
            "",
            "## Quarantines",
            "",
            "| subject | tier | until | probe | reason |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {q['subject']} | {q['tier']} | {q['until'] or '—'} | {q['probe_task'] or '—'} "
            f"| {q['reason']} |"
            for q in report.quarantines
        ]
    if report.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report.errors]
    return "\n".join(lines)
