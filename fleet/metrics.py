"""Prometheus metrics of the fleet and the mesh: what the store says, rendered on demand.

`mesh_metrics(store, now)` builds a fresh registry from the mesh store (queue depth by
status, machines by status, quarantines by kind and tier, breakers across processes,
MTTR and false-positive quarantines from the immune events), so every server that can
reach the store — the node agent's health server, the supervisor's status server
(`metrics_endpoint`), the orchestrator (`push`) — shows the same numbers. Process-local
pipeline counters (stage durations, retries) live in `PIPELINE` for the orchestrator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger("fleet.metrics")

# The orchestrator's own counters: observed where stages run, exported with the mesh's.
PIPELINE = CollectorRegistry()
STAGE_SECONDS = Histogram(
    "fleet_stage_duration_seconds",
    "Pipeline stage durations",
    ["stage"],
    registry=PIPELINE,
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 14400),
)
STAGE_RETRIES = Counter(
    "fleet_stage_retries_total", "Pipeline stage retries", ["stage"], registry=PIPELINE
)


def stage_finished(stage: str, seconds: float) -> None:
    """A stage function returned or raised after `seconds` (fleet.pipeline.timed)."""
    STAGE_SECONDS.labels(stage).observe(max(0.0, seconds))


def stage_retried(stage: str) -> None:
    """A stage task failed transiently and Prefect runs it again (tasks.stages.transient)."""
    STAGE_RETRIES.labels(stage).inc()


def recovery_figures(events: list[dict[str, Any]]) -> dict[str, Any]:
    """MTTR per subject kind (seconds from a quarantine to the release, decay or lift that ends
    it) and the false-positive quarantines (those an operator lifted: judged wrong)."""
    opened: dict[str, datetime] = {}
    repairs: dict[str, list[float]] = {}
    false_positive = 0
    for e in events:
        subject, action = e["subject"], e["action"]
        if action == "quarantine" and subject not in opened:
            opened[subject] = e["at"]
        elif action in ("release", "lift", "decay") and subject in opened:
            start = opened.pop(subject)
            kind = subject.split(":", 1)[0]
            repairs.setdefault(kind, []).append((e["at"] - start).total_seconds())
            if action == "lift":
                false_positive += 1
    return {
        "mttr_seconds": {k: sum(v) / len(v) for k, v in repairs.items()},
        "repairs": {k: len(v) for k, v in repairs.items()},
        "false_positive_quarantines": false_positive,
    }


def mesh_metrics(store: Any, now: datetime, *, since: timedelta | None = None) -> CollectorRegistry:
    """A registry filled from the store now (events limited to `since`, if given)."""
    reg = CollectorRegistry()
    depth = Gauge("fleet_mesh_queue_depth", "Mesh tasks by status", ["status"], registry=reg)
    for status, n in store.queue_stats(now)["depth"].items():
        depth.labels(status).set(n)
    machines = Gauge("fleet_mesh_machines", "Machines by liveness status", ["status"], registry=reg)
    for status in ("alive", "suspect", "down", "left"):
        machines.labels(status).set(0)
    for m in store.machines():
        machines.labels(m.status).inc()
    if hasattr(store, "immune_states"):
        quarantines = Gauge(
            "fleet_mesh_quarantines",
            "Subjects in quarantine by kind and tier",
            ["kind", "tier"],
            registry=reg,
        )
        for s in store.immune_states():
            if s.quarantined(now):
                quarantines.labels(s.subject.kind, str(int(s.tier))).inc()
        events = store.immune_events()
        if since is not None:
            events = [e for e in events if e["at"] >= now - since]
        figures = recovery_figures(events)
        mttr = Gauge(
            "fleet_mesh_mttr_seconds",
            "Mean time from quarantine to release",
            ["kind"],
            registry=reg,
        )
        for kind, seconds in figures["mttr_seconds"].items():
            mttr.labels(kind).set(seconds)
        Gauge(
            "fleet_mesh_false_positive_quarantines", "Quarantines an operator lifted", registry=reg
        ).set(figures["false_positive_quarantines"])
        actions = Gauge(
            "fleet_mesh_immune_actions", "Immune decisions in the window", ["action"], registry=reg
        )
        for e in events:
            actions.labels(e["action"]).inc()
    if hasattr(store, "breaker_rows"):
        from fleet.mesh.watchdog import breaker_snapshot

        open_ = Gauge(
            "fleet_breaker_open",
            "1 when the breaker is open in some process",
            ["name", "state"],
            registry=reg,
        )
        for name, b in breaker_snapshot(store, now).items():
            open_.labels(name, b["state"]).set(1 if b["state"] != "closed" else 0)
    return reg


def render(*registries: CollectorRegistry) -> bytes:
    return b"".join(generate_latest(r) for r in registries)


def metrics_endpoint(
    open_store: Callable[[], Any], clock: Callable[[], datetime]
) -> Callable[[], bytes]:
    """A function a server calls per GET /metrics (the supervisor's status server mounts it):
    opens the store, renders the mesh and this process's pipeline metrics, closes it."""

    def body() -> bytes:
        store = open_store()
        try:
            return render(mesh_metrics(store, clock()), PIPELINE)
        finally:
            store.close()

    return body


def push(
    gateway: str, job: str, registry: CollectorRegistry, grouping: dict[str, str] | None = None
) -> None:
    """Push a registry to a Prometheus Pushgateway (orchestrator runs are short-lived)."""
    from prometheus_client import push_to_gateway

    push_to_gateway(gateway, job=job, registry=registry, grouping_key=grouping, timeout=5)


def push_pipeline(gateway: str, job: str, grouping: dict[str, str] | None = None) -> bool:
    """Push this process's stage durations and retries to `gateway` (FLEET_METRICS_PUSHGATEWAY)
    at the end of a run; True if pushed. A gateway that is away is a warning, never a failure.
    A fanned-out app run (its own process on a worker) pushes under `{"app": <id>}`."""
    if not gateway:
        return False
    try:
        push(gateway, job, PIPELINE, grouping)
    except Exception as exc:
        log.warning("stage metrics not pushed to %s: %s", gateway, exc)
        return False
    return True


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in a Prometheus text exposition."""
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]
