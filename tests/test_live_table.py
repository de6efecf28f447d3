"""`fleet run`'s live table: a refresh reads every state at once, task counts only on a move."""

from __future__ import annotations

import io

from rich.console import Console

from fleet.cli import _live_progress, _progress_table
from fleet.clock import utcnow
from fleet.models import Stage, Task
from fleet.store.sqlite import SQLiteStore


class Counted:
    """The real store, counting the calls made through it."""

    def __init__(self, store: SQLiteStore):
        self.store, self.calls = store, 0

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return method(*args, **kwargs)

        return counted


def rendered(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_a_refresh_is_one_store_call_and_task_counts_are_read_again_only_when_a_stage_moves(
    tmp_path,
):
    real = SQLiteStore(tmp_path / "fleet.db")
    apps = [f"app{i}" for i in range(20)]
    now = utcnow()
    real.ensure_apps(apps, now)
    store, counts = Counted(real), {}
    _progress_table(store, apps, 0.0, counts)
    store.calls = 0
    _progress_table(store, apps, 0.0, counts)
    assert store.calls == 1  # was 4 per app: 80

    epoch = real.claim_app("app3", "test:1", "run", now, 60)
    real.upsert_tasks(
        [Task(app_id="app3", source="skill", priority=p, description=f"t{p}") for p in (1, 2, 3)],
        now,
    )
    real.set_stage("app3", Stage.SKILL_RUNNING, epoch, now)
    real.set_stage("app3", Stage.SKILL_COMPLETE, epoch, now)
    store.calls = 0
    text = rendered(_progress_table(store, apps, 0.0, counts))
    assert store.calls == 3  # the states, then app3's two task counts
    assert any(
        "app3" in line and "skillComplete" in line and " 3 " in line for line in text.splitlines()
    )


def test_the_live_table_reads_the_store_only_where_someone_sees_it(tmp_path):
    """Rich shows no live view when the output is not a terminal (a pipe, a CI log): no frame
    is built there, so 89 apps changing stage get the store to themselves."""
    real = SQLiteStore(tmp_path / "fleet.db")
    apps = [f"app{i}" for i in range(3)]
    real.ensure_apps(apps, utcnow())
    piped, store = io.StringIO(), Counted(real)
    with _live_progress(Console(file=piped), store, apps):
        pass
    assert store.calls == 0 and piped.getvalue() == ""
    with _live_progress(Console(file=io.StringIO(), force_terminal=True), store, apps):
        pass
    assert store.calls >= 1  # the first frame
