"""DISCOVER: rank the fleet by KARL trajectory reward and cut the next cohort."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def rank_apps(
    fleet: Iterable[str], reward_means: Mapping[str, float], default: float = 0.5
) -> list[str]:
    """Highest mean reward first; apps without history score `default` (0.5).

    Ties keep fleet order, so an unranked fleet runs in the order the operator listed it.
    """
    apps = list(fleet)
    order = {app: i for i, app in enumerate(apps)}
    return sorted(apps, key=lambda a: (-reward_means.get(a, default), order[a]))


def select_cohort(ranked: list[str], size: int) -> list[str]:
    """The cohort is the top `size` of the ranking; never the whole fleet at once by accident."""
    if size < 1:
        raise ValueError(f"cohort size must be at least 1, got {size}")
    return ranked[:size]


def reward_for(outcome: str, quality_score: float | None) -> float:
    """A trajectory's reward: a success's quality score (1.0 if Hydra gave none), 0 on failure."""
    if outcome != "success":
        return 0.0
    return 1.0 if quality_score is None else max(0.0, min(1.0, quality_score))
