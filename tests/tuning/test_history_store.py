"""A recorded window read back from a real store, and replayed."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from fleet.clock import ManualClock
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.settings import FleetSettings
from fleet.tuning.genome import current_policy
from fleet.tuning.history import from_store
from fleet.tuning.replay import Prepared, score


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteMeshStore(tmp_path / "fleet.db")
    from fleet.mesh.pg_store import PgMeshStore
    from fleet.store.migrations import apply_migrations
    from tests.mesh.conftest import truncate_mesh

    pg_url = request.getfixturevalue("pg_url")
    apply_migrations(pg_url)
    truncate_mesh(
        pg_url
    )  # the database is the session's: another test's queued task would be claimed
    return PgMeshStore(pg_url)


def test_a_recorded_window_becomes_runs_with_inferred_labels_and_replays(store):
    # A window of its own (the PostgreSQL database is shared by the session's tests).
    clock = ManualClock(datetime(2031, 6, 1, tzinfo=UTC))
    start = clock.now()
    tag = uuid.uuid4().hex[:6]
    mac1, mac2 = f"tune1-{tag}", f"tune2-{tag}"
    for m in (mac1, mac2):
        store.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), clock.now(), None, [])
    stuck = store.enqueue(
        "skill", ["claude", "-p", "fix"], clock.now(), task_id=f"t-stuck-{tag}", target=mac1
    )
    fine = store.enqueue(
        "skill", ["claude", "-p", "fix"], clock.now(), task_id=f"t-fine-{tag}", target=mac2
    )
    clock.advance(10)
    [a] = store.claim(mac1, clock.now())
    [b] = store.claim(mac2, clock.now())
    assert {a.task_id, b.task_id} == {stuck, fine}
    mine = {a.task_id: mac1, b.task_id: mac2}
    for task_id, machine in mine.items():
        store.transition(task_id, machine, TaskStatus.INJECTED, clock.now())
    clock.advance(110)
    store.progress(stuck, mine[stuck], clock.now(), note="compiling")
    clock.advance(180)
    store.transition(fine, mine[fine], TaskStatus.DONE, clock.now(), output="ok")
    for k in range(1, 121):  # both agents beat every 30 s through the hour (the log keeps it)
        for m in (mac1, mac2):
            at = start + timedelta(seconds=30 * k)
            store.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), at, None, [])
    clock.advance(1500)
    store.reconcile(
        clock.now(), orphan_seconds=600, stuck_seconds=900, expiry_seconds=86400, max_attempts=3
    )
    end = start + timedelta(hours=1)
    h = from_store(store, start, end)
    assert not h.labelled and h.horizon == 3600
    runs = {r.task_id: r for r in h.tasks if r.task_id in (stuck, fine)}
    assert runs[fine].outcome == "success" and runs[fine].ended_at == 300
    assert runs[stuck].hung_at == 120 and runs[stuck].ended_at is None
    assert runs[stuck].reason == "stuck"
    assert {mac1, mac2} <= {m.machine_id for m in h.machines}
    mine_only = replace(
        h,
        tasks=tuple(runs.values()),
        machines=tuple(m for m in h.machines if m.machine_id in (mac1, mac2)),
    )
    s = score(Prepared(mine_only), current_policy(FleetSettings()), FleetSettings())
    # The recorded policy's own verdict is found again: 120 + 900 → tick 1080, healed 960 s after.
    assert (s.detected, s.false_positives, s.misses) == (1, 0, 0)
    assert s.mttr == 960


def test_the_replay_uses_the_logged_heartbeats_and_the_log_is_pruned_after_8_days(store):
    start = datetime(2032, 1, 1, tzinfo=UTC)
    tag = uuid.uuid4().hex[:6]
    quiet, steady = f"quiet-{tag}", f"steady-{tag}"
    beats = {
        # Silent for 15 minutes with no MachineDown: a rebuild would have filled the gap.
        quiet: [0, 30, 60, 960, 990],
        steady: [0, 30, 60, 90, 120],
    }
    for machine, offsets in beats.items():
        for t in offsets:
            at = start + timedelta(seconds=t)
            store.heartbeat(MachineIdentity(machine_id=machine, mesh_id="prod"), at, None, [])
    assert store.heartbeat_log(start, start + timedelta(hours=1)) == {
        m: [start + timedelta(seconds=t) for t in offsets] for m, offsets in beats.items()
    }
    h = from_store(store, start, start + timedelta(seconds=1000))
    tracks = {m.machine_id: m for m in h.machines if m.machine_id in beats}
    for machine, offsets in beats.items():
        assert tracks[machine].heartbeats.tolist() == [float(t) for t in offsets]

    # Bounded: a beat 8 days and a second after the first prunes that machine's older ones.
    later = start + timedelta(days=8, seconds=61)
    store.heartbeat(MachineIdentity(machine_id=steady, mesh_id="prod"), later, None, [])
    logged = store.heartbeat_log(start, later)
    assert logged[steady] == [start + timedelta(seconds=t) for t in (90, 120)] + [later]
    assert len(logged[quiet]) == 5  # another machine's entries wait for its own beat
