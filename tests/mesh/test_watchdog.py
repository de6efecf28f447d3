"""The mesh watchdog: pure checks, and one cycle over a real store, real endpoints and breakers."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta

from fleet.clock import ManualClock
from fleet.mesh.liveness import LivenessProbe
from fleet.mesh.pg_store import PgMeshStore
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.mesh.watchdog import (
    panes_over_budget,
    panes_to_respawn,
    stale_machines,
    watchdog_cycle,
)
from fleet.settings import FleetSettings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = FleetSettings()


def pane(
    machine: str,
    pane_id: str,
    *,
    alive: bool = True,
    task: str | None = None,
    ratio: float | None = None,
) -> dict:
    return {
        "machine_id": machine,
        "pane_id": pane_id,
        "task_id": task,
        "alive": alive,
        "context_ratio": ratio,
        "updated_at": T0,
    }


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/health"


def test_context_budget_hands_off_at_exactly_the_ratio():
    panes = [
        pane("mac1", "%1", task="a", ratio=0.85),
        pane("mac1", "%2", task="b", ratio=0.8499),
        pane("mac1", "%3", task=None, ratio=0.99),
        pane("mac1", "%4", alive=False, task="d", ratio=0.9),
    ]
    assert [p.pane_id for p in panes_over_budget(panes, S.context_handoff_ratio)] == ["%1"]
    assert [(p.pane_id, p.task_id) for p in panes_to_respawn(panes)] == [("%4", "d")]


def test_stale_machines_are_those_still_up_with_a_missed_heartbeat(tmp_path):
    store = SQLiteMeshStore(tmp_path / "m.db")
    clock = ManualClock(T0)
    for m in ("mac1", "mac3", "mac4"):
        store.heartbeat(MachineIdentity(machine_id=m, mesh_id="x"), clock.now(), None, [])
    store.mark_down("mac4", clock.now(), max_attempts=3)
    clock.advance(1.5 * S.heartbeat_seconds)
    store.heartbeat(MachineIdentity(machine_id="mac3", mesh_id="x"), clock.now(), None, [])
    assert (
        stale_machines(store.machines(), clock.now(), S.heartbeat_seconds) == []
    )  # exactly 1.5 periods
    assert stale_machines(store.machines(), clock.advance(0.001), S.heartbeat_seconds) == ["mac1"]
    store.close()


def test_one_cycle_reports_every_part_and_hands_off_over_budget_tasks(tmp_path):
    from fleet.clients.breaker import breaker_for

    store = SQLiteMeshStore(tmp_path / "m.db")
    clock = ManualClock(T0)
    store.heartbeat(
        MachineIdentity(machine_id="mac1", mesh_id="x"), clock.now(), closed_port_url(), []
    )
    store.heartbeat(MachineIdentity(machine_id="mac3", mesh_id="x"), clock.now(), None, [])
    for t in ("big", "small"):
        store.enqueue("skill", [t], clock.now(), task_id=t)
    store.enqueue("skill", ["waiting"], clock.now(), task_id="waiting")
    store.claim("mac3", clock.now(), limit=2)
    store.transition("big", "mac3", TaskStatus.RUNNING, clock.now(), pane_id="%1")
    store.progress("big", "mac3", clock.now(), note="phase 2 of 3: UI tests green")
    store.set_pane_state("mac3", "%1", clock.now(), task_id="big", alive=True, context_ratio=0.91)
    store.set_pane_state("mac3", "%2", clock.now(), task_id="small", alive=True, context_ratio=0.30)
    store.set_pane_state("mac3", "%3", clock.now(), task_id=None, alive=False)
    name = f"aura-{uuid.uuid4().hex[:6]}"
    breaker = breaker_for(name, failure_threshold=1)
    breaker.record_failure("503 from gateway")

    clock.advance(2 * S.heartbeat_seconds + 1)
    store.heartbeat(
        MachineIdentity(machine_id="mac3", mesh_id="x"), clock.now(), None, ["big", "small"]
    )
    # One confirmation a round here (spacing 0): the cycle's second round declares it down.
    probe = LivenessProbe.from_settings(
        store, S, timeout_seconds=0.5, confirm_spacing_seconds=0, clock=clock
    )
    report = watchdog_cycle(store, clock.now(), S, probe)

    assert report.errors == []
    assert report.stale_machines == ["mac1"]
    assert [(v.machine_id, v.outcome) for v in report.liveness.checked] == [("mac1", "failed")]
    assert [(p.machine_id, p.pane_id) for p in report.respawn] == [("mac3", "%3")]
    assert [(h.pane.task_id, h.requeued) for h in report.handoffs] == [("big", True)]
    big = store.get_task("big")
    assert (big.status, big.attempts, big.claimed_by) == (TaskStatus.QUEUED, 0, None)
    assert "91%" in big.checkpoint and "phase 2 of 3: UI tests green" in big.checkpoint
    assert report.queue["depth"]["queued"] == 2 and report.queue["depth"]["claimed"] == 1
    assert report.breakers[name]["state"] == "open"
    summary = report.summary()
    assert summary["handoffs"] == 1 and summary["panes_to_respawn"] == 1
    assert name in summary["open_breakers"] and summary["queued"] == 2

    # The pane still reports the old task: the next cycle finds it is no longer mac3's.
    again = watchdog_cycle(store, clock.advance(S.heartbeat_seconds), S, probe)
    assert [(h.pane.task_id, h.requeued) for h in again.handoffs] == [("big", False)]
    assert again.liveness.declared_down == ["mac1"]
    probe.close()
    store.close()
    from fleet.clients import breaker as breaker_module

    with breaker_module._REGISTRY_LOCK:  # leave the process-wide registry as we found it
        breaker_module._REGISTRY.pop(name, None)


def test_a_broken_store_is_reported_not_raised():
    broken = PgMeshStore("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_seconds=1)
    report = watchdog_cycle(broken, T0, S, LivenessProbe.from_settings(broken, S))
    # Heartbeats, panes, queue, the shared breaker states, the immune system and the
    # metabolism: each reported.
    assert len(report.errors) == 6
    assert all("127.0.0.1:1/nowhere" in e for e in report.errors)
    assert report.liveness is None and report.handoffs == []


def test_a_stale_pane_row_never_hands_off_a_fresh_claim_of_its_task(any_store):
    store, clock = any_store, ManualClock(T0)
    mac1 = MachineIdentity(machine_id="mac1", mesh_id="x")
    store.heartbeat(mac1, clock.now(), None, [])
    store.enqueue("skill", ["x"], clock.now(), task_id="t")
    [first] = store.claim("mac1", clock.now())
    store.transition(
        "t", "mac1", TaskStatus.INJECTED, clock.now(), pane_id="%1", claim_seq=first.claim_seq
    )
    # The agent's heartbeat writes its pane view: %1 runs t at 90 % of its context.
    store.set_pane_state(
        "mac1",
        "%1",
        clock.advance(30),
        task_id="t",
        alive=True,
        context_ratio=0.9,
        claim_seq=first.claim_seq,
    )
    # A second later the agent hands t off itself, claims it again and types it into a fresh pane.
    assert store.handoff(
        "t", "mac1", clock.advance(1), "the agent's own checkpoint", claim_seq=first.claim_seq
    )
    [second] = store.claim("mac1", clock.advance(14))
    store.transition(
        "t", "mac1", TaskStatus.INJECTED, clock.advance(1), pane_id="%2", claim_seq=second.claim_seq
    )
    store.heartbeat(mac1, clock.advance(4), None, ["t"])

    report = watchdog_cycle(store, clock.advance(5), S, None)  # the %1 row is 25 s old
    assert [(h.pane.task_id, h.requeued) for h in report.handoffs] == [("t", False)]
    task = store.get_task("t")
    assert (task.status, task.claim_seq, task.checkpoint) == (
        TaskStatus.INJECTED,
        second.claim_seq,
        "the agent's own checkpoint",
    )
    assert store.events("t", event="Handoff")[-1].at == T0 + timedelta(seconds=31)


def test_a_pane_row_of_the_current_claim_is_handed_off(any_store):
    store, clock = any_store, ManualClock(T0)
    store.heartbeat(MachineIdentity(machine_id="mac1", mesh_id="x"), clock.now(), None, [])
    store.enqueue("skill", ["x"], clock.now(), task_id="t")
    [claim] = store.claim("mac1", clock.now())
    store.transition("t", "mac1", TaskStatus.RUNNING, clock.now(), pane_id="%1")
    # Written without a claim (an older agent): the store records the task's current claim.
    store.set_pane_state(
        "mac1", "%1", clock.advance(30), task_id="t", alive=True, context_ratio=0.9
    )
    assert store.pane_states("mac1")[0]["claim_seq"] == claim.claim_seq
    report = watchdog_cycle(store, clock.advance(5), S, None)
    assert [(h.pane.task_id, h.requeued) for h in report.handoffs] == [("t", True)]
    assert store.get_task("t").status is TaskStatus.QUEUED


def test_the_watchdog_reports_breakers_opened_in_another_process(tmp_path):
    """A breaker opened by another process (the cohort flow's gateway client) is in the report:
    every process writes its breaker changes to the store."""
    import subprocess
    import sys

    from fleet.mesh.watchdog import watchdog_cycle

    db = tmp_path / "mesh.db"
    script = (
        "from fleet.clients.breaker import breaker_for, share_states\n"
        "from fleet.mesh.sqlite_store import SQLiteMeshStore\n"
        f"share_states(SQLiteMeshStore({str(db)!r}))\n"
        "b = breaker_for('aura-elsewhere', failure_threshold=2)\n"
        "b.record_failure('503'); b.record_failure('503')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    store = SQLiteMeshStore(db)

    report = watchdog_cycle(store, datetime.now(UTC), FleetSettings(), None)
    assert report.breakers["aura-elsewhere"]["state"] == "open"
    assert "aura-elsewhere" in report.summary()["open_breakers"]
    store.close()
