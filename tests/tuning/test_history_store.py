"""A recorded window read back from a real store, and replayed."""

from __future__ import annotations

from datetime import timedelta

from fleet.clock import ManualClock
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.settings import FleetSettings
from fleet.tuning.genome import current_policy
from fleet.tuning.history import from_store
from fleet.tuning.replay import Prepared, score


def test_a_recorded_window_becomes_runs_with_inferred_labels_and_replays(tmp_path):
    clock = ManualClock()
    start = clock.now()
    store = SQLiteMeshStore(tmp_path / "fleet.db")
    for m in ("mac1", "mac2"):
        store.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), clock.now(), None, [])
    stuck = store.enqueue("skill", ["claude", "-p", "fix"], clock.now(), task_id="t-stuck")
    fine = store.enqueue("skill", ["claude", "-p", "fix"], clock.now(), task_id="t-fine")
    clock.advance(10)
    [a] = store.claim("mac1", clock.now())
    [b] = store.claim("mac2", clock.now())
    assert {a.task_id, b.task_id} == {stuck, fine}
    mine = {a.task_id: "mac1", b.task_id: "mac2"}
    for task_id, machine in mine.items():
        store.transition(task_id, machine, TaskStatus.INJECTED, clock.now())
    clock.advance(110)
    store.progress(stuck, mine[stuck], clock.now(), note="compiling")
    clock.advance(180)
    store.transition(fine, mine[fine], TaskStatus.DONE, clock.now(), output="ok")
    for m in ("mac1", "mac2"):
        store.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), start + timedelta(hours=1),
                        None, [])
    clock.advance(1500)
    store.reconcile(clock.now(), orphan_seconds=600, stuck_seconds=900, expiry_seconds=86400,
                    max_attempts=3)
    end = start + timedelta(hours=1)
    h = from_store(store, start, end)
    assert not h.labelled and h.horizon == 3600
    runs = {r.task_id: r for r in h.tasks}
    assert runs[fine].outcome == "success" and runs[fine].ended_at == 300
    assert runs[stuck].hung_at == 120 and runs[stuck].ended_at is None
    assert runs[stuck].reason == "stuck"
    assert {m.machine_id for m in h.machines} == {"mac1", "mac2"}
    s = score(Prepared(h), current_policy(FleetSettings()), FleetSettings())
    # The recorded policy's own verdict is found again: 120 + 900 → tick 1080, healed 960 s after.
    assert (s.detected, s.false_positives, s.misses) == (1, 0, 0)
    assert s.mttr == 960
