"""How the engine's runs present themselves in the Prefect UI: the names and tags an
operator finds them by, and the one-line refusals a run's first step gives."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

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


def fleet_file_problem(fleet_file: str | None, cwd: Path) -> str | None:
    """Why a run's `fleet_file` parameter cannot be used, in one line; None when it can (an
    empty one falls back to FLEET_FLEET_FILE or the Fleet Config block, checked later)."""
    if not fleet_file or (cwd / fleet_file).is_file():
        return None
    where = "" if Path(fleet_file).is_absolute() else f" (relative to {cwd})"
    return (
        f"fleet_file: {fleet_file} does not exist{where} — pass the path of your fleet file, "
        "or run `uv run fleet demo` once in this checkout to create .fleet/demo/fleet.yaml"
    )
