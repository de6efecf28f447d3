"""The mesh-reconciler and mesh-watchdog flows under the session Prefect harness."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from fleet.clock import utcnow
from fleet.events import MACHINE_DOWN, TASK_DEAD_LETTERED
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity, ReconcileCounts, TaskStatus
from fleet.settings import get_settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def events(monkeypatch):
    """Capture the Prefect events the flows emit."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    AssertingEventsClient.reset()
    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)

    def emitted(name: str):
        worker.drain()
        return [e for c in AssertingEventsClient.all for e in c.events if e.event == name]

    yield emitted
    worker.drain()


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    monkeypatch.setenv("FLEET_STORE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


async def _artifact(key: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        response = await client._client.post(
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
        )
    found = response.json()
    return found[0] if found else None


async def test_reconciler_flow_runs_one_cycle_and_reports_it(store_url, events, tmp_path):
    from flows.mesh import reconciler

    now = utcnow()
    store = SQLiteMeshStore(tmp_path / "fleet.db")
    store.enqueue("skill", ["x"], now - timedelta(minutes=30), task_id="orphan")
    store.heartbeat(
        MachineIdentity(machine_id="gone-machine", mesh_id="m"),
        now - timedelta(minutes=20),
        None,
        [],
    )
    store.claim("gone-machine", now - timedelta(minutes=20))
    store.enqueue("skill", ["y"], now - timedelta(days=2), task_id="ancient")

    counts = await reconciler()

    assert counts == ReconcileCounts(orphaned_requeued=1, expired=1)
    assert store.get_task("orphan").status is TaskStatus.QUEUED
    assert store.get_task("ancient").status is TaskStatus.EXPIRED
    assert [ReconcileCounts(**e.detail) for e in store.events(event="ReconcilerRun")] == [counts]
    [event] = events("fleet.mesh.reconciler-run")
    assert event.payload == counts.model_dump()
    artifact = await _artifact("mesh-reconciler")
    assert artifact is not None and "orphaned_requeued" in str(artifact["data"])
    store.close()


async def test_each_dead_letter_is_an_event_the_automation_matches(store_url, events, tmp_path):
    from flows.mesh import reconciler

    now = utcnow()
    store = SQLiteMeshStore(tmp_path / "fleet.db")
    store.heartbeat(
        MachineIdentity(machine_id="gone-machine", mesh_id="m"),
        now - timedelta(minutes=20),
        None,
        [],
    )
    for task_id in ("t1", "t2"):
        store.enqueue("skill", ["x"], now - timedelta(minutes=30), task_id=task_id)
    for _ in range(get_settings().max_task_attempts):  # each orphaned claim spends an attempt
        store.claim("gone-machine", now - timedelta(minutes=20), limit=2)
        store.reconcile(now, **_thresholds())
    store.enqueue("skill", ["x"], now - timedelta(minutes=30), task_id="t3")
    store.claim("gone-machine", now - timedelta(minutes=20), limit=3)

    counts = await reconciler()

    letters = events(TASK_DEAD_LETTERED)
    assert counts.dead_lettered == len(letters) >= 1
    assert {e.resource.id for e in letters} <= {
        "fleet.mesh.task.t1",
        "fleet.mesh.task.t2",
        "fleet.mesh.task.t3",
    }
    store.close()


def _thresholds() -> dict:
    from dataclasses import asdict

    from fleet.mesh.rules import Thresholds

    return asdict(Thresholds.from_settings(get_settings()))


async def test_watchdog_flow_confirms_liveness_and_publishes_a_report(store_url, events, tmp_path):
    from flows.mesh import watchdog

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}/health"
    sock.close()
    now = utcnow()
    store = SQLiteMeshStore(tmp_path / "fleet.db")
    store.heartbeat(
        MachineIdentity(machine_id="mac1", mesh_id="m"), now - timedelta(minutes=5), closed, []
    )
    store.set_pane_state("mac1", "%1", now, task_id=None, alive=False)

    # One run takes both confirmations, 5 s apart (liveness_confirm_spacing_seconds).
    first = await watchdog(store_url=store_url)
    assert [(v.machine_id, v.outcome) for v in first.liveness.checked] == [
        ("mac1", "declared_down")
    ]
    assert first.liveness.declared_down == ["mac1"]
    assert [p.pane_id for p in first.respawn] == ["%1"]
    artifact = await _artifact("mesh-watchdog")
    assert artifact is not None and "| mac1 | declared_down | 2 |" in artifact["data"]
    second = await watchdog()
    assert second.liveness is None  # down: not judged again until it heartbeats

    runs = events("fleet.mesh.watchdog-run")
    assert len(runs) == 2 and runs[0].payload["panes_to_respawn"] == 1
    assert [e.resource.id for e in events(MACHINE_DOWN)] == ["fleet.mesh.machine.mac1"]
    store.close()


async def test_the_mesh_flows_honour_the_store_block(mesh_pg_url, tmp_path, monkeypatch, events):
    """With only FLEET_STORE_BLOCK set, the reconciler and the watchdog work on the Block's
    database, not on a local SQLite file they would create under FLEET_HOME."""
    from blocks.store import PostgresStoreBlock
    from fleet.mesh.pg_store import PgMeshStore
    from flows.mesh import reconciler, watchdog
    from tests.mesh.conftest import truncate_mesh

    truncate_mesh(mesh_pg_url)
    await PostgresStoreBlock(conninfo=mesh_pg_url, apply_schema=False).save(
        "mesh-flows", overwrite=True
    )
    monkeypatch.delenv("FLEET_STORE_URL", raising=False)
    monkeypatch.setenv("FLEET_STORE_BLOCK", "fleet-postgres-store/mesh-flows")
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        await reconciler()
        await watchdog()
    finally:
        get_settings.cache_clear()
    pg = PgMeshStore(mesh_pg_url)
    assert len(pg.events(event="ReconcilerRun")) == 1
    pg.close()
    assert not (tmp_path / "home" / "fleet.db").exists()
