"""The genome: the healing thresholds of the settings model, each with safe bounds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet.mesh.immune import ImmunePolicy
from fleet.mesh.rules import Thresholds

if TYPE_CHECKING:  # numpy only where vectors are made: `fleet` commands start without it
    import numpy as np

Policy = dict[str, float]


@dataclass(frozen=True)
class Gene:
    """One threshold (a FleetSettings field), its safe bounds and the step it moves in."""

    name: str
    low: float
    high: float
    step: float = 1.0  # values are multiples of this (seconds round to 5 s, counts to 1)

    def clip(self, value: float) -> float:
        snapped = round(float(value) / self.step) * self.step
        return float(min(self.high, max(self.low, snapped)))


# The bounds keep every candidate safe to run: nothing detects in less than two reconciler
# cycles, nothing waits longer than an hour, heartbeats stay within the metabolism's pace
# (30–300 s), and counts stay where one unlucky minute cannot quarantine or kill.
GENES: tuple[Gene, ...] = (
    Gene("orphan_claim_seconds", 120, 3600, 5),
    Gene("stuck_injection_seconds", 180, 3600, 5),
    Gene("liveness_confirmations", 1, 6),
    Gene("heartbeat_seconds", 30, 300, 5),
    Gene("immune_window_heartbeats", 3, 40),
    Gene("immune_soft_failures", 2, 8),
    Gene("immune_hard_failures", 3, 12),
    Gene("immune_soft_heartbeats", 1, 30),
    Gene("immune_hard_heartbeats", 5, 120),
    Gene("immune_recalibrate_ejections", 2, 8),
)
GENE_NAMES: tuple[str, ...] = tuple(g.name for g in GENES)


class InvalidPolicy(ValueError):
    """A policy that names an unknown threshold or lacks one."""


def current_policy(settings: Any) -> Policy:
    """The thresholds in force now (the settings model): always in the first population."""
    return {g.name: float(getattr(settings, g.name)) for g in GENES}


def repair(policy: Mapping[str, float]) -> Policy:
    """Snap to steps and bounds, and keep the tiers ordered (hard needs more failures than soft)."""
    unknown = sorted(set(policy) - set(GENE_NAMES))
    missing = sorted(set(GENE_NAMES) - set(policy))
    if unknown or missing:
        raise InvalidPolicy(
            f"policy genes do not match the genome: unknown {unknown}, missing {missing}"
        )
    out = {g.name: g.clip(policy[g.name]) for g in GENES}
    out["immune_hard_failures"] = max(out["immune_hard_failures"], out["immune_soft_failures"] + 1)
    return out


def to_vector(policy: Mapping[str, float]) -> np.ndarray:
    import numpy as np

    return np.array([float(policy[name]) for name in GENE_NAMES])


def from_vector(x: Any) -> Policy:
    return repair(dict(zip(GENE_NAMES, (float(v) for v in x), strict=True)))


def key(policy: Mapping[str, float]) -> tuple[float, ...]:
    """A hashable identity of a repaired policy (the evaluation cache's key)."""
    return tuple(policy[name] for name in GENE_NAMES)


def thresholds(policy: Mapping[str, float], settings: Any) -> Thresholds:
    return Thresholds(
        orphan_seconds=policy["orphan_claim_seconds"],
        stuck_seconds=policy["stuck_injection_seconds"],
        expiry_seconds=settings.task_expiry_seconds,
        max_attempts=settings.max_task_attempts,
    )


def immune_policy(policy: Mapping[str, float], settings: Any) -> ImmunePolicy:
    """The immune system's policy with the genome's values over the settings' others."""
    return ImmunePolicy.from_settings(settings.model_copy(update=settings_update(policy)))


def settings_update(policy: Mapping[str, float]) -> dict[str, float | int]:
    """The policy as FleetSettings field values (counts as ints), e.g. for model_copy(update=…)."""
    return {name: int(v) if _is_count(name) else float(v) for name, v in policy.items()}


def _is_count(name: str) -> bool:
    return not name.endswith("_seconds")


def distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """How far apart two policies are, each gene as a share of its range."""
    return math.sqrt(sum(((a[g.name] - b[g.name]) / (g.high - g.low)) ** 2 for g in GENES))
