"""The anomaly that calls the healing tuner: the immune system's tier 3 "recalibrate".

A subject ejected for the `immune_recalibrate_ejections`-th time says the thresholds no longer
fit the mesh. The watchdog announces each such ejection as RECALIBRATE; the trigger of the
`healing-tuner/daily` deployment (prefect.yaml) matches it and runs the tuner with reason
"recalibrate: <subject>": it decides the running trial, evolves, and puts its best candidate
on a canary — never a direct apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet import events
from fleet.mesh.immune import Tier

RECALIBRATE = "fleet.mesh.recalibrate"
RESOURCE_PREFIX = "fleet.mesh."  # + the subject, e.g. fleet.mesh.machine:mac3


@dataclass(frozen=True)
class Recalibration:
    subject: str  # e.g. "machine:mac3"
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def resource_id(self) -> str:
        return RESOURCE_PREFIX + self.subject


def recalibrations(actions: Iterable[Mapping[str, Any]]) -> list[Recalibration]:
    """The tier-3 ejections among a watchdog cycle's immune actions
    ({subject, action, tier, detail}, as WatchdogReport.immune_actions holds them)."""
    return [
        Recalibration(str(a["subject"]), dict(a.get("detail") or {}))
        for a in actions
        if a["action"] == "alert" and int(a["tier"]) == Tier.RECALIBRATE
    ]


def announce(actions: Iterable[Mapping[str, Any]]) -> int:
    """Emit RECALIBRATE once per tier-3 ejection (best effort, like every fleet event);
    returns how many were queued for sending."""
    return sum(
        events.emit(
            RECALIBRATE,
            r.resource_id,
            name=r.subject,
            payload={"tier": int(Tier.RECALIBRATE), **r.detail},
        )
        for r in recalibrations(actions)
    )
