"""How the engine's runs present themselves in the Prefect UI: the names and tags an
operator finds them by, and the one-line refusals a run's first step gives."""

from __future__ import annotations

from datetime import UTC, datetime

FLEET_TAG = "fleet"  # cohort and app runs: the Runs page filtered on it shows the fleet's work
MESH_TAG = "mesh"  # reconciler, watchdog and tuner: housekeeping, kept out of the fleet filter


def cohort_run_name(size: int | None, at: datetime) -> str:
    """`cohort-2026-11-30T04:00-size3`: when the run was due (UTC) and what it was asked;
    a cohort without `size` grows 10 → 20 → 40 and says `progressive`."""
    when = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    return f"cohort-{when}-" + (f"size{size}" if size else "progressive")


def app_run_tags(app_id: str, cohort_run: str) -> list[str]:
    """An app's flow run is found by the fleet, by its app and by the cohort run that sent it."""
    return [FLEET_TAG, f"app:{app_id}", f"cohort:{cohort_run}"]
