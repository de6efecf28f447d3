"""An applied policy changes behaviour: the reconciler and the node agent read the thresholds
each machine runs (its canary candidate, else the policy in force, else the settings), on a
real SQLite file and the real PostgreSQL, with an injected clock."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from fleet.clock import ManualClock
from fleet.mesh.open import open_mesh_store
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.settings import FleetSettings
from fleet.tuning.genome import current_policy
from fleet.tuning.policies import (
    PoliciesInForce,
    policy_store_beside,
    read_in_force,
)
from flows.mesh import reconcile_cycle, watchdog_probe

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
S = FleetSettings(agent_panes=1, mesh_id="")
CANDIDATE_ORPHAN = 300.0  # the default is S.orphan_claim_seconds (600 s)
CANDIDATE_HEARTBEAT = 90.0  # the default is S.heartbeat_seconds (30 s)
POLICY_TABLES = "mesh_policy_log, mesh_policy_assignments, mesh_policy_trials, mesh_policies"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request, tmp_path):
    """(mesh store, policy store) on one fresh database, as the flows and agents open them."""
    url = None
    if request.param == "sqlite":
        mesh = open_mesh_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    else:
        from fleet.store.migrations import apply_migrations

        url = request.getfixturevalue("pg_url")
        apply_migrations(url)
        _empty(url)
        mesh = open_mesh_store(url)
    policies = policy_store_beside(mesh)
    assert policies is not None
    yield mesh, policies
    policies.close()
    mesh.close()
    if url is not None:  # the session's database: leave no running trial to other tests
        _empty(url)


def _empty(url: str) -> None:
    import psycopg

    from tests.mesh.conftest import MESH_TABLES

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {MESH_TABLES}, {POLICY_TABLES} RESTART IDENTITY CASCADE")


def canary(policies, machines: list[str], **genes: float) -> tuple[str, str]:
    """A candidate differing from the settings in `genes`, on one of two machines:
    returns (canary machine, control machine)."""
    base = current_policy(S)
    version = policies.propose({**base, **genes}, offerable=True, figures={}, by="test", now=T0)
    trial = policies.start_trial(version, machines, 0.5, baseline=base, by="test", now=T0)
    [on] = trial.machines
    [off] = sorted(set(machines) - {on})
    return on, off


def test_no_policy_applied_is_the_settings_everywhere(stores):
    _, policies = stores
    in_force = read_in_force(policies)
    assert in_force == PoliciesInForce()
    assert in_force.settings_for(S, "mac-a") is S
    assert read_in_force(None).reconcile_thresholds(S)[1] == {}


def test_reconcile_requeues_a_canary_claim_at_the_candidate_timeout_and_others_at_the_default(
    stores,
):
    mesh, policies = stores
    clock = ManualClock(T0)
    machines = ["mac-a", "mac-b"]
    on, off = canary(policies, machines, orphan_claim_seconds=CANDIDATE_ORPHAN)
    for m in machines:  # each claims one task, then falls silent
        mesh.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), clock.now(), None, [])
        mesh.enqueue("skill", ["x"], clock.now(), task_id=f"task-{m}")
        [claimed] = mesh.claim(m, clock.now())
        assert claimed.task_id == f"task-{m}"

    def status(m: str) -> TaskStatus:
        return mesh.get_task(f"task-{m}").status

    at_candidate = T0 + timedelta(seconds=CANDIDATE_ORPHAN)
    assert reconcile_cycle(mesh, policies, S, at_candidate).orphaned_requeued == 0
    counts = reconcile_cycle(mesh, policies, S, at_candidate + US)
    assert counts.orphaned_requeued == 1
    assert (status(on), status(off)) == (TaskStatus.QUEUED, TaskStatus.CLAIMED)
    requeue = [e for e in mesh.events(f"task-{on}") if e.event == "queued"][-1]
    assert (requeue.machine_id, requeue.detail["reason"]) == (on, "orphaned")

    at_default = T0 + timedelta(seconds=S.orphan_claim_seconds)
    assert reconcile_cycle(mesh, policies, S, at_default).orphaned_requeued == 0
    assert status(off) is TaskStatus.CLAIMED
    assert reconcile_cycle(mesh, policies, S, at_default + US).orphaned_requeued == 1
    assert status(off) is TaskStatus.QUEUED

    # Rolled back: the canary machine is judged by the policy in force again.
    policies.rollback(by="test", now=at_default)
    assert read_in_force(policies).reconcile_thresholds(S)[1] == {}


def test_a_policy_store_outage_keeps_the_last_answer(stores, tmp_path):
    _, policies = stores
    on, _ = canary(policies, ["mac-a", "mac-b"], heartbeat_seconds=CANDIDATE_HEARTBEAT)
    known = read_in_force(policies)

    class Down:
        def in_force(self):
            from fleet.errors import StoreUnavailable

            raise StoreUnavailable("policy store down")

    assert read_in_force(Down(), known) is known  # type: ignore[arg-type]
    assert read_in_force(Down()) == PoliciesInForce()  # type: ignore[arg-type]
    assert known.settings_for(S, on).heartbeat_seconds == CANDIDATE_HEARTBEAT


def test_the_watchdog_judges_a_canary_machine_by_its_candidate_heartbeat_and_confirmations(stores):
    from fleet.mesh.liveness import Reach
    from fleet.mesh.watchdog import watchdog_cycle

    mesh, policies = stores
    on, off = canary(
        policies,
        ["mac-a", "mac-b"],
        heartbeat_seconds=CANDIDATE_HEARTBEAT,
        liveness_confirmations=1,
    )
    for m in (on, off):
        mesh.heartbeat(
            MachineIdentity(machine_id=m, mesh_id="prod"), T0, f"http://{m}.invalid/health", []
        )
    in_force = read_in_force(policies)
    probe = watchdog_probe(
        mesh, in_force, S, check=lambda url: Reach.UNREACHABLE, clock=ManualClock(T0)
    )
    # The control's 30 s heartbeat is missed (1.5 periods); the canary's 90 s one is not.
    report = watchdog_cycle(mesh, T0 + timedelta(seconds=61), in_force.settings_for(S), probe)
    assert report.stale_machines == [off]
    # One round takes the settings' two confirmations, spaced apart on the injected clock.
    assert {v.machine_id: (v.outcome, v.failed_confirmations) for v in report.liveness.checked} == {
        off: ("declared_down", 2)
    }
    # The canary's period missed too: it is down at its candidate's single confirmation.
    later = T0 + timedelta(seconds=2 * CANDIDATE_HEARTBEAT + 1)
    report = watchdog_cycle(mesh, later, in_force.settings_for(S), probe)
    assert report.stale_machines == [on]
    assert {v.machine_id: (v.outcome, v.failed_confirmations) for v in report.liveness.checked} == {
        on: ("declared_down", 1)
    }


@pytest.mark.tmux
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs a tmux binary")
def test_the_agent_on_a_canary_machine_heartbeats_at_the_candidate_interval(stores, tmp_path):
    import libtmux

    from fleet.mesh.agent import NodeAgent
    from fleet.mesh.tmux import PaneControl
    from tests.mesh.test_tmux import kill_server

    mesh, policies = stores
    clock = ManualClock(T0)
    on, off = canary(policies, ["mac-a", "mac-b"], heartbeat_seconds=CANDIDATE_HEARTBEAT)
    servers = [libtmux.Server(socket_name=f"fleet-test-{uuid.uuid4().hex[:10]}") for _ in "ab"]
    agents = {
        m: NodeAgent(
            MachineIdentity(machine_id=m, mesh_id="prod", role="viewer"),
            mesh,
            PaneControl(server),
            clock=clock,
            settings=S,
            agent_command=[],
            state_path=tmp_path / f"state-{m}.json",
        )
        for m, server in zip((on, off), servers, strict=True)
    }

    def beats() -> dict[str, datetime]:
        return {m.machine_id: m.last_heartbeat for m in mesh.machines()}

    try:
        for agent in agents.values():
            agent.tick()
        assert beats() == {on: T0, off: T0}
        clock.advance(S.heartbeat_seconds)
        for agent in agents.values():
            agent.tick()
        # The control beats at the settings' 30 s; the canary waits for its candidate's 90 s.
        assert beats() == {on: T0, off: clock.now()}
        clock.advance(CANDIDATE_HEARTBEAT - S.heartbeat_seconds)
        for agent in agents.values():
            agent.tick()
        assert beats() == {on: clock.now(), off: clock.now()}
    finally:
        for server in servers:
            kill_server(server)
