"""The cohort's progress artifact: apps that finish together share updates; the last is 100 %."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fleet.clock import SystemClock, utcnow
from fleet.settings import FleetSettings
from fleet.store.sqlite import SQLiteStore

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def test_apps_finishing_together_share_progress_updates_and_the_last_says_100(
    tmp_path, monkeypatch
):
    from prefect import flow, get_client
    from prefect.artifacts import acreate_progress_artifact

    import flows.cohort as cohort

    store = SQLiteStore(tmp_path / "fleet.db")
    apps = [f"app{i:02d}" for i in range(40)]
    store.ensure_apps(apps, utcnow())
    written: list[float] = []
    update = cohort.aupdate_progress_artifact

    async def counted(artifact_id, progress: float, description: str | None = None):
        written.append(progress)
        return await update(artifact_id, progress=progress, description=description)

    monkeypatch.setattr(cohort, "aupdate_progress_artifact", counted)

    @flow
    async def forty_apps_finish_at_once():
        progress = cohort.Progress(
            SimpleNamespace(store=store, settings=FleetSettings(), clock=SystemClock()),
            len(apps),
            await acreate_progress_artifact(progress=0.0, key="progress-test"),
        )
        await asyncio.gather(*(progress.tick(a) for a in apps))
        await progress.close()
        return progress.artifact_id

    artifact_id = await forty_apps_finish_at_once()
    assert written[-1] == 100.0
    assert len(written) < len(apps) / 2, written  # one API call per app queued behind the loop
    async with get_client() as client:
        artifact = await client.read_artifacts()
    assert [a.data for a in artifact if a.id == artifact_id] == [100.0]
