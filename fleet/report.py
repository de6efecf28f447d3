"""What an operator sees per app: one row of the cohort table, the table, a markdown summary."""

from __future__ import annotations

import textwrap

from pydantic import BaseModel
from rich import box
from rich.table import Table

from fleet.models import Stage
from fleet.store.base import Store

COLUMNS = (
    "app",
    "final stage",
    "skill tasks",
    "adversarial issues",
    "quality",
    "shipped",
    "duration",
)


class AppRow(BaseModel):
    app: str
    stage: str
    skill_tasks: int
    adversarial_issues: int
    quality: float | None
    shipped: bool
    duration_s: float
    error: str | None = None
    note: str | None = None
    notes: list[str] = []

    def cells(self) -> list[str]:
        quality = "—" if self.quality is None else f"{self.quality:.2f}"
        stage = self.stage + (f" ({self.note})" if self.note else "")
        return [
            self.app,
            stage,
            str(self.skill_tasks),
            str(self.adversarial_issues),
            quality,
            "yes" if self.shipped else "no",
            f"{self.duration_s:.1f}s",
        ]

    def record(self) -> dict[str, object]:
        """A row for Prefect's table artifact."""
        row: dict[str, object] = dict(zip(COLUMNS, self.cells(), strict=True))
        return row | {"error": self.error or ""}


def app_row(
    store: Store, app_id: str, note: str | None = None, notes: list[str] | None = None
) -> AppRow:
    state = store.get_state(app_id)
    stage = state.stage if state else Stage.QUEUED
    trajectories = store.list_trajectories(app_id)
    last = trajectories[-1] if trajectories else None
    return AppRow(
        app=app_id,
        stage=stage.value,
        skill_tasks=len(store.list_tasks(app_id, "skill")),
        adversarial_issues=len(store.list_tasks(app_id, "adversarial")),
        quality=last.quality_score if last else None,
        # SHIP runs before the stage becomes `complete`, so complete means shipped.
        shipped=stage is Stage.COMPLETE,
        duration_s=sum(last.durations.values()) if last else 0.0,
        error=state.error if state else None,
        note=note,
        notes=notes or [],
    )


def markdown_summary(row: AppRow) -> str:
    lines = [
        f"# {row.app}: {row.stage}",
        "",
        "| skill tasks | adversarial issues | quality | shipped | duration |",
        "|---|---|---|---|---|",
        "| " + " | ".join(row.cells()[2:]) + " |",
    ]
    if row.error:
        lines += ["", f"**Error:** {row.error}"]
    if row.notes:
        lines += ["", "**Notes:**", *[f"- {n}" for n in row.notes]]
    return "\n".join(lines)


ID_WIDTH = 26
STAGE_STYLE = {"complete": "green", "failed": "red", "queued": "dim"}


def result_table(rows: list[AppRow]) -> Table:
    """The cohort's result as the terminal shows it. App ids stay whole at any width (80
    columns, or a file, where rich assumes 80): the other columns wrap their words instead,
    and an id wider than the screen folds onto a second line rather than losing its end."""
    table = Table(title="fleet cohort — result", box=box.SIMPLE_HEAD, pad_edge=False)
    # no_wrap keeps rich from narrowing (and cutting) the id column first; an id longer than
    # ID_WIDTH is broken onto more lines here, whole, rather than squeezing the other columns.
    table.add_column(COLUMNS[0], no_wrap=True)
    for col in COLUMNS[1:]:
        table.add_column(col, overflow="fold")
    for row in rows:
        cells = row.cells()
        cells[0] = "\n".join(textwrap.wrap(cells[0], ID_WIDTH, break_on_hyphens=False))
        cells[1] = f"[{STAGE_STYLE.get(row.stage, 'yellow')}]{cells[1]}[/]"
        table.add_row(*cells)
    return table


def progress_line(done: int, failed: int, total: int) -> str:
    """The cohort's progress in words: finished apps, the done and the failed apart."""
    return f"{done} done, {failed} failed of {total}"


def failure_message(failed: dict[str, str], started: int) -> str:
    """One line for a failed cohort run's state message: how many apps failed, and why."""
    reasons = "; ".join(f"{app}: {_first_line(reason)}" for app, reason in failed.items())
    return f"{len(failed)} of {started} apps failed — {reasons}"


def _first_line(text: str, limit: int = 200) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"
