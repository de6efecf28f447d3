"""The Prefect events the fleet emits (names, resource ids) and the one helper that emits them.

Events show in the Prefect UI's Event Feed and drive the automations `fleet automations
install` creates. Emitting is best effort: an alert must never break the work it reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# Event names: `fleet.<part>.<what happened>`; automations match them exactly.
BREAKER_OPENED = "fleet.breaker.opened"
TASK_DEAD_LETTERED = "fleet.mesh.task.dead-lettered"
MACHINE_DOWN = "fleet.mesh.machine.down"
EVENTS = (BREAKER_OPENED, TASK_DEAD_LETTERED, MACHINE_DOWN)
# One per cycle of the mesh deployments, with the cycle's counts.
RECONCILER_RUN = "fleet.mesh.reconciler-run"
WATCHDOG_RUN = "fleet.mesh.watchdog-run"
# An immune decision: `fleet.mesh.<action>` for these actions, on the subject's resource.
IMMUNE_ACTIONS = ("quarantine", "release", "alert", "braked")

# Resource id prefixes; an event's resource is `<prefix><name or id>`.
BREAKER_RESOURCE = "fleet.breaker."
TASK_RESOURCE = "fleet.mesh.task."
MACHINE_RESOURCE = "fleet.mesh.machine."
MESH_RESOURCE = "fleet.mesh"  # the mesh itself (the deployments' cycles)
SUBJECT_RESOURCE = "fleet.mesh."  # + an immune subject, e.g. fleet.mesh.pane:mac1/%3


def breaker_opened(name: str, *, failures: int | None = None, reason: str | None = None) -> bool:
    """A circuit breaker (e.g. the gateway's) opened: calls through it fail fast for a while."""
    return emit(
        BREAKER_OPENED,
        BREAKER_RESOURCE + name,
        name=name,
        payload={"failures": failures, "reason": reason},
    )


def task_dead_lettered(
    task_id: str, *, attempts: int, reason: str, machine_id: str | None = None
) -> bool:
    """A mesh task failed more attempts than allowed and will not run again on its own."""
    related = [_machine(machine_id)] if machine_id else []
    return emit(
        TASK_DEAD_LETTERED,
        TASK_RESOURCE + task_id,
        name=task_id,
        payload={"attempts": attempts, "reason": reason},
        related=related,
    )


def machine_down(machine_id: str, *, reason: str, requeued: int | None = None) -> bool:
    """The mesh declared a machine down; its claims go back to the queue."""
    return emit(
        MACHINE_DOWN,
        MACHINE_RESOURCE + machine_id,
        name=machine_id,
        payload={"reason": reason, "requeued": requeued},
    )


def reconciler_run(counts: Mapping[str, Any]) -> bool:
    """One reconciler cycle ended: the tasks it moved, per rule."""
    return emit(RECONCILER_RUN, MESH_RESOURCE, name="fleet mesh", payload=counts)


def watchdog_run(summary: Mapping[str, Any]) -> bool:
    """One watchdog cycle ended: its flat counts (WatchdogReport.summary)."""
    return emit(WATCHDOG_RUN, MESH_RESOURCE, name="fleet mesh", payload=summary)


def immune_action(
    action: str, subject: str, *, tier: int, detail: Mapping[str, Any] | None = None
) -> bool:
    """The immune system quarantined, released, braked or alerted on a subject (other actions
    — correctives, decays — are not announced)."""
    if action not in IMMUNE_ACTIONS:
        return False
    return emit(
        f"fleet.mesh.{action}",
        SUBJECT_RESOURCE + subject,
        name=subject,
        payload={"tier": tier, **(detail or {})},
    )


def emit(
    event: str,
    resource_id: str,
    *,
    name: str | None = None,
    payload: Mapping[str, Any] | None = None,
    related: list[dict[str, str]] | None = None,
) -> bool:
    """Hand one event to Prefect's event worker; True if it was queued for sending.

    Never raises, and does nothing (False) when no Prefect API is configured: without one,
    Prefect would start a temporary server just to receive it.
    """
    try:
        from prefect.events import emit_event
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            return False
        resource = {"prefect.resource.id": resource_id}
        if name:
            resource["prefect.resource.name"] = name
        sent = emit_event(
            event,
            resource=resource,
            related=related or None,
            payload={k: v for k, v in (payload or {}).items() if v is not None},
        )
        return sent is not None
    except Exception as exc:  # an alert that fails to send must not fail the caller
        log.warning("could not emit Prefect event %s for %s: %s", event, resource_id, exc)
        return False


def _machine(machine_id: str) -> dict[str, str]:
    return {
        "prefect.resource.id": MACHINE_RESOURCE + machine_id,
        "prefect.resource.role": "machine",
        "prefect.resource.name": machine_id,
    }
