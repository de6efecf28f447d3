"""The node agent on real tmux (temp sockets), a real SQLite mesh store and the scripted agent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import libtmux
import pytest
from typer.testing import CliRunner

from fleet.clock import ManualClock, utcnow
from fleet.errors import ConfigError, StoreUnavailable
from fleet.mesh.agent import NodeAgent, finished, task_section, task_text
from fleet.mesh.cli import agent_app
from fleet.mesh.liveness import LivenessProbe
from fleet.mesh.open import open_mesh_store
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.mesh.tmux import PaneControl, context_ratio
from fleet.settings import FleetSettings
from tests.mesh.conftest import truncate_mesh
from tests.mesh.test_tmux import SCRIPTED, kill_server

pytestmark = [
    pytest.mark.tmux,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs a tmux binary"),
]

SETTINGS = FleetSettings(agent_panes=1, mesh_id="")


def open_store(path: Path):
    return open_mesh_store(f"sqlite:///{path}")


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "mesh.db"


@pytest.fixture
def store(db):
    return open_store(db)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def servers():
    """A factory of tmux servers on unique temp sockets, all killed afterwards."""
    made: list[libtmux.Server] = []

    def make() -> libtmux.Server:
        server = libtmux.Server(socket_name=f"fleet-test-{uuid.uuid4().hex[:10]}")
        made.append(server)
        return server

    yield make
    for server in made:
        kill_server(server)


@pytest.fixture
def make_agent(store, clock, servers, tmp_path):
    """Build NodeAgents; each machine gets its own tmux server unless one is passed."""
    agents: list[NodeAgent] = []

    def make(
        machine_id="mac3",
        *,
        role="worker",
        command=None,
        server=None,
        agent_store=None,
        settings=SETTINGS,
        **kwargs,
    ) -> NodeAgent:
        agent = NodeAgent(
            MachineIdentity(machine_id=machine_id, mesh_id="prod", role=role),
            agent_store or store,
            PaneControl(server or servers(), chunk_bytes=settings.tmux_chunk_bytes),
            clock=clock,
            settings=settings,
            agent_command=SCRIPTED if command is None else command,
            state_path=tmp_path / f"state-{machine_id}.json",
            **kwargs,
        )
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        if agent._health is not None:
            agent._health.stop()


def tick_until(agents, condition, timeout: float = 10.0) -> None:
    """Tick the agents until `condition()` holds; real waits only for tmux output to appear."""
    agents = agents if isinstance(agents, list) else [agents]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for agent in agents:
            agent.tick()
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_ready(agent: NodeAgent, timeout: float = 10.0) -> None:
    """Wait (real time, no ticks) until every pane's agent has drawn its first output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.pane_ids and all(agent.panes.read_pane(p, 50).strip() for p in agent.pane_ids):
            return
        time.sleep(0.02)
    raise AssertionError(f"panes {agent.pane_ids} did not come up within {timeout}s")


def status_of(store, task_id) -> TaskStatus:
    return store.get_task(task_id).status


def event_names(store, task_id) -> list[str]:
    return [e.event for e in store.events(task_id)]


# -- pure helpers --------------------------------------------------------------------------


def test_markers_and_output_are_parsed_from_the_task_section():
    pane = (
        "TASK old x\nDONE old\nTASK t1 do it\nACK "
        + "a" * 40
        + "\ncontext: 42%\nOUTPUT t1 do it\nDONE t1\n"
    )
    section = task_section(pane, "t1")
    assert finished(section, "t1") == (TaskStatus.DONE, "OUTPUT t1 do it")
    assert finished("FAILED t2 disk full", "t2") == (TaskStatus.FAILED, "disk full")
    assert finished("still working", "t1") is None
    assert task_section("nothing typed yet", "t1") is None


# -- identity ------------------------------------------------------------------------------


def test_unsupported_protocol_generation_is_refused(store, servers, clock, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"machine mac3 speaks protocol generation 2; this mesh supports 1 — upgrade",
    ):
        NodeAgent(
            MachineIdentity(machine_id="mac3", mesh_id="prod", generation=2),
            store,
            PaneControl(servers()),
            clock=clock,
            settings=SETTINGS,
            agent_command=SCRIPTED,
            state_path=tmp_path / "s.json",
        )
    assert store.machines() == []


def test_mismatched_mesh_id_is_refused(make_agent, store):
    with pytest.raises(ConfigError, match=r"belongs to mesh 'prod'.*configured for mesh 'staging'"):
        make_agent(expected_mesh_id="staging")
    with pytest.raises(ConfigError, match="staging"):
        make_agent(settings=FleetSettings(agent_panes=1, mesh_id="staging"))
    assert store.machines() == []


# -- cadence, claim, run -----------------------------------------------------------------------


def test_heartbeat_and_claim_follow_their_cadence(make_agent, store, clock):
    agent = make_agent()
    agent.tick()
    first = {m.machine_id: m for m in store.machines()}["mac3"]
    assert first.last_heartbeat == clock.now() and first.role == "worker"
    wait_ready(agent)

    task_id = store.enqueue("skill", ["hang"], clock.now())
    clock.advance(10)
    agent.tick()
    assert status_of(store, task_id) is TaskStatus.QUEUED  # next claim is due at 15 s
    assert store.machines()[0].last_heartbeat == clock.now() - timedelta(seconds=10)
    clock.advance(5)
    agent.tick()
    assert status_of(store, task_id) is TaskStatus.INJECTED
    clock.advance(15)
    agent.tick()
    assert store.machines()[0].last_heartbeat == clock.now()  # 30 s after the first
    assert task_id in store.machines()[0].active_tasks


def test_claimed_task_is_injected_run_and_done(make_agent, store, clock):
    agent = make_agent()
    task_id = store.enqueue("skill", ["evolve", "app-1"], clock.now())
    agent.tick()
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.DONE)
    task = store.get_task(task_id)
    assert task.output == f"OUTPUT {task_id} evolve app-1"
    assert task.claimed_by == "mac3" and task.pane_id == agent.pane_ids[0]
    names = event_names(store, task_id)
    assert [n for n in names if n in ("claimed", "injected", "running", "done")] == [
        "claimed",
        "injected",
        "running",
        "done",
    ]
    assert agent.tasks == {}


def test_failed_marker_fails_the_task(make_agent, store, clock):
    agent = make_agent()
    task_id = store.enqueue("skill", ["fail", "compiler", "crashed"], clock.now())
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.FAILED)
    assert store.get_task(task_id).error == "compiler crashed"


def test_exited_agent_pane_is_respawned_and_takes_the_next_task(make_agent, store, clock):
    agent = make_agent(command=[*SCRIPTED, "--exit-after", "1"])  # the agent exits after one task
    agent.tick()
    wait_ready(agent)
    pane_id = agent.pane_ids[0]
    first_pid = agent.panes.pane(pane_id).pid
    first = store.enqueue("skill", ["one"], clock.now())
    clock.advance(SETTINGS.claim_seconds)
    tick_until(agent, lambda: status_of(store, first) is TaskStatus.DONE)
    # tick() sees the pane dead and respawns the agent in the same pane.
    tick_until(
        agent, lambda: agent.panes.pane(pane_id).pid != first_pid and agent.panes.is_alive(pane_id)
    )
    assert agent.pane_ids == [pane_id]

    second = store.enqueue("skill", ["two"], clock.now())
    clock.advance(SETTINGS.claim_seconds)
    tick_until(agent, lambda: status_of(store, second) is TaskStatus.DONE)
    assert store.get_task(second).pane_id == pane_id


def test_agent_dying_mid_task_is_respawned_and_the_task_reinjected(make_agent, store, clock):
    agent = make_agent()
    task_id = store.enqueue(
        "skill", ["exit", "now"], clock.now()
    )  # the agent crashes on it, every time
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.FAILED, timeout=15)
    notes = [e.detail.get("note", "") for e in store.events(task_id) if e.event == "Progress"]
    assert sum("respawned" in n for n in notes) == SETTINGS.max_task_attempts
    assert "exited" in store.get_task(task_id).error
    assert agent.panes.is_alive(agent.pane_ids[0])  # left healthy for the next task


def test_context_budget_hands_the_task_off(make_agent, store, clock):
    agent = make_agent(command=[*SCRIPTED, "--context-step", "50"])  # 42 % → 92 % on the first task
    task_id = store.enqueue("skill", ["hang", "long", "job"], clock.now())
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.QUEUED and agent.tasks == {})
    task = store.get_task(task_id)
    # A checkpoint that re-triggers the hand-off on the next machine would loop forever.
    assert task.checkpoint and context_ratio(task_text(task)) is None
    assert "Handoff" in event_names(store, task_id)
    pane_text = agent.panes.read_pane(agent.pane_ids[0], 500)
    assert f"TASK {task_id}" not in pane_text  # the pane restarted with a fresh context
    # The next claim carries the checkpoint on the TASK line.
    assert "[checkpoint: " in task_text(task)


def test_idle_pane_past_the_budget_is_restarted_before_new_work(make_agent, store, clock):
    # 50 % at start, 90 % after one task: the task finishes, but the pane is then too full.
    agent = make_agent(command=[*SCRIPTED, "--context-start", "50", "--context-step", "40"])
    first = store.enqueue("skill", ["one"], clock.now())
    tick_until(agent, lambda: status_of(store, first) is TaskStatus.DONE)
    pane_id = agent.pane_ids[0]
    pid_after_first = agent.panes.pane(pane_id).pid

    second = store.enqueue("skill", ["two"], clock.now())
    clock.advance(SETTINGS.claim_seconds)
    tick_until(agent, lambda: status_of(store, second) is TaskStatus.DONE)
    assert agent.panes.pane(pane_id).pid != pid_after_first  # fresh agent for the second task
    assert store.events(second, event="Handoff") == []
    assert f"TASK {first}" not in agent.panes.read_pane(pane_id, 500)


# -- viewers, racing claimers ----------------------------------------------------------------------


def test_viewer_never_claims_or_spawns(make_agent, store, clock):
    viewer = make_agent("viewer1", role="viewer")
    ids = [store.enqueue("skill", ["x"], clock.now()) for _ in range(3)]
    for _ in range(5):
        viewer.tick()
        clock.advance(SETTINGS.claim_seconds)
    assert viewer.claim_work(10) == []
    assert all(status_of(store, i) is TaskStatus.QUEUED for i in ids)
    assert viewer.pane_ids == [] and viewer.panes.list_panes() == []
    assert {m.machine_id: m.role for m in store.machines()} == {"viewer1": "viewer"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_factory(request, db):
    """Opens connections to one fresh mesh database: a SQLite file or the test PostgreSQL."""
    if request.param == "sqlite":
        yield lambda: open_store(db)
        return
    from fleet.mesh.pg_store import PgMeshStore

    url = request.getfixturevalue("mesh_pg_url")
    truncate_mesh(url)
    yield lambda: PgMeshStore(url)


def test_two_agents_racing_on_1000_tasks_claim_each_exactly_once(
    make_agent, store_factory, clock, request
):
    seed = store_factory()
    ids = {seed.enqueue("skill", ["t", str(i)], clock.now()) for i in range(1000)}
    agents = [make_agent(f"mac{n}", agent_store=store_factory()) for n in (1, 2)]
    for agent in agents:
        agent.store.heartbeat(agent.identity, clock.now(), None, [])
    got: dict[str, list[str]] = {a.machine_id: [] for a in agents}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def race(agent: NodeAgent) -> None:
        try:
            barrier.wait()
            while batch := agent.claim_work(1):
                got[agent.machine_id].extend(t.task_id for t in batch)
                # SQLite's busy handler backs off in ms steps; without a pause the thread holding
                # the GIL and the lock could take all 1 000 and nothing would race.
                time.sleep(0.001)
        except BaseException as exc:  # surfaced below; a thread must not swallow it
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(a,)) for a in agents]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.monotonic() - started
    assert not errors, errors
    claimed = got["mac1"] + got["mac2"]
    assert len(claimed) == 1000 and set(claimed) == ids  # every task once, none twice
    assert got["mac1"] and got["mac2"], f"no race happened: {[len(v) for v in got.values()]}"
    for machine, task_ids in got.items():
        assert all(seed.get_task(i).claimed_by == machine for i in task_ids)
    print(
        f"\n[{request.node.callspec.id}] 1000 claims by 2 racing agents in {elapsed:.2f}s "
        f"(mac1 {len(got['mac1'])}, mac2 {len(got['mac2'])})"
    )


def test_two_agents_with_panes_finish_every_task_once(make_agent, db, clock):
    settings = FleetSettings(agent_panes=2)
    agents = [make_agent(f"mac{n}", agent_store=open_store(db), settings=settings) for n in (1, 2)]
    seed = open_store(db)
    ids = [seed.enqueue("skill", ["job", str(i)], clock.now()) for i in range(8)]

    def all_done() -> bool:
        if all(status_of(seed, i) is TaskStatus.DONE for i in ids):
            return True
        clock.advance(settings.claim_seconds)  # let the next claim come due
        return False

    tick_until(agents, all_done, timeout=15)
    for task_id in ids:
        assert [e.event for e in seed.events(task_id)].count("done") == 1
        assert [e.event for e in seed.events(task_id)].count("claimed") == 1
        assert seed.get_task(task_id).output == f"OUTPUT {task_id} job {ids.index(task_id)}"
    assert {seed.get_task(i).claimed_by for i in ids} == {"mac1", "mac2"}


# -- restart, leave ------------------------------------------------------------------------------


def test_restart_readopts_persisted_tasks(make_agent, store, clock, servers):
    server = servers()
    first = make_agent(server=server)
    first.tick()  # panes up, nothing to claim yet
    wait_ready(first)
    running = store.enqueue("skill", ["first"], clock.now(), task_id="t1-running")
    claimed_only = store.enqueue("skill", ["second"], clock.now(), task_id="t2-claimed")
    clock.advance(SETTINGS.claim_seconds)
    first.tick()  # claims `running` into the only pane and types it
    assert first.claim_work(1)[0].task_id == claimed_only  # claimed, then the agent "crashes"
    first._save_state()
    state = json.loads(first.state_path.read_text())
    assert set(state["tasks"]) == {running, claimed_only}
    assert (
        state["tasks"][running]["injected"] is True
        and state["tasks"][claimed_only]["injected"] is False
    )
    pane_id = first.pane_ids[0]
    del first  # no shutdown: a crash

    again = make_agent(server=server)
    again.start()
    assert set(again.tasks) == {running, claimed_only}
    assert again.pane_ids == [pane_id]  # the surviving pane is adopted, not duplicated
    tick_until(
        again,
        lambda: (
            status_of(store, running) is TaskStatus.DONE
            and status_of(store, claimed_only) is TaskStatus.DONE
        ),
    )
    text = again.panes.read_pane(pane_id, 500)
    assert text.count(f"TASK {running}") == 1  # re-adopted, not typed a second time
    assert store.get_task(claimed_only).claimed_by == "mac3"


def test_task_requeued_while_away_is_stopped_on_restart(make_agent, store, clock, servers):
    server = servers()
    first = make_agent(server=server)
    task_id = store.enqueue("skill", ["hang"], clock.now())
    tick_until(first, lambda: status_of(store, task_id) is TaskStatus.RUNNING)
    pane_id = first.pane_ids[0]
    assert store.mark_down("mac3", clock.now()) == 1  # declared down while it was away
    assert status_of(store, task_id) is TaskStatus.QUEUED

    other = make_agent("mac4")
    again = make_agent(server=server)
    again.start()
    assert again.tasks == {}
    text = again.panes.read_pane(pane_id, 500)
    assert f"TASK {task_id}" not in text  # the orphaned work was stopped here
    clock.advance(SETTINGS.claim_seconds)
    tick_until(other, lambda: status_of(store, task_id) is TaskStatus.RUNNING)
    assert store.get_task(task_id).claimed_by == "mac4"


def test_claim_taken_away_while_running_is_stopped_here(make_agent, store, clock):
    """Declared down by mistake (it was only partitioned): its task moved to mac4, so mac3 must
    stop its copy when it comes back — the task never runs in two panes at once."""
    mac3 = make_agent("mac3")
    task_id = store.enqueue("skill", ["hang"], clock.now())
    tick_until(mac3, lambda: status_of(store, task_id) is TaskStatus.RUNNING)
    store.mark_down("mac3", clock.now())
    mac4 = make_agent("mac4")
    tick_until(mac4, lambda: status_of(store, task_id) is TaskStatus.RUNNING)
    assert store.get_task(task_id).claimed_by == "mac4"

    clock.advance(SETTINGS.claim_seconds)
    mac3.tick()
    assert mac3.tasks == {}
    assert f"TASK {task_id}" not in mac3.panes.read_pane(mac3.pane_ids[0], 500)
    assert f"TASK {task_id}" in mac4.panes.read_pane(mac4.pane_ids[0], 500)
    assert store.get_task(task_id).claimed_by == "mac4"


def test_shutdown_leaves_the_mesh_and_requeues_claims(make_agent, store, clock):
    agent = make_agent(health_port=0, health_host="127.0.0.1")
    task_id = store.enqueue("skill", ["hang"], clock.now())
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.RUNNING)
    url = agent.health_url
    assert agent.shutdown() == 1
    assert status_of(store, task_id) is TaskStatus.QUEUED
    assert {m.machine_id: m.status for m in store.machines()}["mac3"] == "left"
    assert f"TASK {task_id}" not in agent.panes.read_pane(agent.pane_ids[0], 500)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=1)


class CommitLost:
    """A store whose first successful claim commits but whose answer never reaches the agent."""

    def __init__(self, inner):
        self.inner, self.armed = inner, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def claim(self, *args, **kwargs):
        claimed = self.inner.claim(*args, **kwargs)
        if self.armed and claimed:
            self.armed = False
            raise StoreUnavailable("connection lost during COMMIT (simulated)")
        return claimed


def test_a_claim_committed_but_never_heard_of_is_adopted_and_run(make_agent, any_store, clock):
    agent = make_agent(agent_store=CommitLost(any_store))
    task_id = any_store.enqueue("skill", ["evolve", "app-1"], clock.now())
    agent.tick()  # the claim commits in the store; the agent sees an error
    assert status_of(any_store, task_id) is TaskStatus.CLAIMED and agent.tasks == {}
    # The next claim round verifies the store's claims and adopts it: no 24 h wait for expiry.
    tick_until(agent, lambda: status_of(any_store, task_id) is TaskStatus.DONE)
    task = any_store.get_task(task_id)
    assert (task.attempts, task.output) == (0, f"OUTPUT {task_id} evolve app-1")
    assert [e.event for e in any_store.events(task_id)].count("claimed") == 1


class RequeuedMidClaim:
    """The reconciler requeues our task (stuck) between the claim check and the next claim."""

    def __init__(self, inner, clock):
        self.inner, self.clock, self.armed = inner, clock, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def tasks_of(self, machine_id):
        ours = self.inner.tasks_of(machine_id)
        if self.armed:
            self.armed = False
            counts = self.inner.reconcile(
                self.clock.now(),
                orphan_seconds=600,
                stuck_seconds=900,
                expiry_seconds=86400,
                max_attempts=3,
            )
            assert counts.stuck_requeued == 1
        return ours


def test_a_task_reclaimed_by_the_same_machine_never_runs_twice(make_agent, any_store, clock):
    hook = RequeuedMidClaim(any_store, clock)
    agent = make_agent(agent_store=hook, settings=FleetSettings(agent_panes=2, mesh_id=""))
    task_id = any_store.enqueue("skill", ["hang"], clock.now())
    tick_until(agent, lambda: status_of(any_store, task_id) is TaskStatus.RUNNING)
    first = agent.tasks[task_id]
    old_pane, old_pid = first.pane_id, agent.panes.pane(first.pane_id).pid
    time.sleep(0.2)
    agent.tick()  # the pane output is settled: no more progress to report

    clock.advance(16 * 60)  # the pane froze for 16 min: stuck
    hook.armed = True
    agent.tick()
    second = agent.tasks[task_id]
    assert second.claim_seq == first.claim_seq + 1
    # The old attempt was stopped before the new one was typed anywhere.
    assert agent.panes.pane(old_pane).pid != old_pid
    tick_until(agent, lambda: status_of(any_store, task_id) is TaskStatus.RUNNING)
    holding = [p for p in agent.pane_ids if f"TASK {task_id}" in agent.panes.read_pane(p, 500)]
    assert holding == [agent.tasks[task_id].pane_id]
    # Whatever the old attempt writes now is refused.
    assert not any_store.transition(
        task_id, "mac3", TaskStatus.DONE, clock.now(), output="old", claim_seq=first.claim_seq
    )
    assert any_store.get_task(task_id).status is TaskStatus.RUNNING


# -- health endpoint and CLI -----------------------------------------------------------------------


def test_health_endpoint_reports_identity_tasks_and_panes(make_agent, store, clock):
    agent = make_agent(health_port=0, health_host="127.0.0.1")
    task_id = store.enqueue("skill", ["hang"], clock.now())
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.RUNNING)
    body = httpx.get(agent.health_url, timeout=2).json()
    assert body["identity"] == {
        "machine_id": "mac3",
        "mesh_id": "prod",
        "generation": 1,
        "role": "worker",
    }
    assert body["status"] == "ok"
    assert body["last_heartbeat"] == clock.now().isoformat()
    assert body["active_tasks"] == [
        {"task_id": task_id, "status": "running", "pane_id": agent.pane_ids[0]}
    ]
    assert body["panes"][0]["alive"] is True and body["panes"][0]["task_id"] == task_id
    assert body["panes"][0]["context_ratio"] == pytest.approx(0.42)
    assert httpx.get(agent.health_url.replace("/health", "/nope"), timeout=2).status_code == 404

    result = CliRunner().invoke(
        agent_app, ["status", "--url", agent.health_url.removesuffix("/health")]
    )
    assert result.exit_code == 0, result.output
    assert "mac3" in result.output and task_id in result.output and "42%" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "boss"], "--role 'boss' is not one of"),
        (["--machine-id", "a;b"], "invalid machine identity"),
        (["--generation", "2"], "speaks protocol generation 2"),
        (["--expect-mesh", "staging"], "configured for mesh 'staging'"),
        (["--store-url", "mysql://x"], "unsupported mesh store URL scheme"),
        (["--agent-command", "'unclosed"], "cannot be split"),
    ],
)
def test_start_rejects_bad_input_with_exit_2(args, message, tmp_path):
    base = {
        "--machine-id": "mac3",
        "--mesh-id": "prod",
        "--store-url": f"sqlite:///{tmp_path / 'm.db'}",
        "--tmux-socket": f"fleet-test-{uuid.uuid4().hex[:8]}",
        "--health-port": "0",
        "--state-path": str(tmp_path / "state.json"),
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["start", *[x for pair in base.items() for x in pair]]
    result = CliRunner().invoke(agent_app, argv)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert "Traceback" not in result.output


def test_status_of_an_absent_agent_says_so():
    result = CliRunner().invoke(
        agent_app, ["status", "--url", "http://127.0.0.1:9", "--timeout", "1"]
    )
    assert result.exit_code == 1
    assert "no node agent answered" in result.output


# -- kill -9 ---------------------------------------------------------------------------------------


def test_killed_agent_claims_are_requeued_and_finished_elsewhere(make_agent, db, clock, tmp_path):
    """A real agent process holding claims is killed -9; once declared down its work moves."""
    socket = f"fleet-test-{uuid.uuid4().hex[:10]}"
    victim_server = libtmux.Server(socket_name=socket)
    seed = open_store(db)
    ids = [seed.enqueue("skill", ["job", str(i)], clock.now()) for i in range(3)]
    proc = start_agent_process(
        db,
        tmp_path,
        "victim",
        socket,
        "--panes",
        "3",
        "--agent-command",
        " ".join([*map(str, SCRIPTED), "--hang"]),
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(status_of(seed, i) is TaskStatus.RUNNING for i in ids):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        else:
            raise AssertionError("the agent process did not start running its claims")
        assert {seed.get_task(i).claimed_by for i in ids} == {"victim"}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)

        # Liveness, on the injected clock: heartbeats missed and the health endpoint unreachable,
        # twice in a row → declared down → its claims are requeued.
        clock.advance((utcnow() - clock.now()).total_seconds() + 3 * SETTINGS.heartbeat_seconds)
        probe = LivenessProbe(
            seed,
            heartbeat_seconds=SETTINGS.heartbeat_seconds,
            confirmations=SETTINGS.liveness_confirmations,
            max_attempts=SETTINGS.max_task_attempts,
        )
        try:
            first = probe.confirm(clock.now())
            assert first.declared_down == [] and first.checked[0].outcome == "failed"
            clock.advance(SETTINGS.heartbeat_seconds)
            second = probe.confirm(clock.now())
        finally:
            probe.close()
        assert second.declared_down == ["victim"] and second.requeued == 3
        assert all(status_of(seed, i) is TaskStatus.QUEUED for i in ids)
        assert seed.claim("victim", clock.now(), limit=3) == []  # down machines get nothing

        rescuer = make_agent(
            "rescuer", agent_store=open_store(db), settings=FleetSettings(agent_panes=3)
        )
        tick_until(
            rescuer, lambda: all(status_of(seed, i) is TaskStatus.DONE for i in ids), timeout=10
        )
        for task_id in ids:
            names = [e.event for e in seed.events(task_id)]
            assert names.count("done") == 1
            assert seed.get_task(task_id).claimed_by == "rescuer"
            assert seed.get_task(task_id).output == f"OUTPUT {task_id} job {ids.index(task_id)}"

        # The victim's panes still hold its old copies; restarted, it stops them (the state
        # file lists them, the store says they are someone else's now).
        victim_panes = PaneControl(victim_server)
        assert (
            sum(
                f"TASK {i}" in victim_panes.read_pane(p.pane_id, 500)
                for p in victim_panes.list_panes()
                for i in ids
            )
            == 3
        )
        proc.stdout.close()
        proc = start_agent_process(
            db,
            tmp_path,
            "victim",
            socket,
            "--panes",
            "3",
            "--agent-command",
            " ".join([*map(str, SCRIPTED), "--hang"]),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            "TASK " in victim_panes.read_pane(p.pane_id, 500) for p in victim_panes.list_panes()
        ):
            time.sleep(0.05)
        assert not any(
            "TASK " in victim_panes.read_pane(p.pane_id, 500) for p in victim_panes.list_panes()
        )
        assert all(seed.get_task(i).claimed_by == "rescuer" for i in ids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout:
            proc.stdout.close()
        kill_server(victim_server)


def start_agent_process(db: Path, tmp_path: Path, machine_id: str, socket: str, *extra: str):
    env = {
        **os.environ,
        "FLEET_HOME": str(tmp_path / f"{machine_id}-home"),
        "FLEET_AGENT_TICK_SECONDS": "0.05",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.mesh.cli",
            "start",
            "--machine-id",
            machine_id,
            "--mesh-id",
            "prod",
            "--store-url",
            f"sqlite:///{db}",
            "--tmux-socket",
            socket,
            "--health-port",
            "0",
            "--health-host",
            "127.0.0.1",
            "--state-path",
            str(tmp_path / f"{machine_id}.json"),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_leaves_the_mesh_gracefully(db, clock, tmp_path):
    """A real agent process: its health endpoint answers `fleet agent status`; SIGTERM makes
    it leave the mesh (claims requeued) and exit 0."""
    socket = f"fleet-test-{uuid.uuid4().hex[:10]}"
    seed = open_store(db)
    task_id = seed.enqueue("skill", ["hang"], clock.now())
    proc = start_agent_process(
        db, tmp_path, "mac5", socket, "--agent-command", " ".join(map(str, SCRIPTED))
    )
    try:
        url = None
        for line in proc.stdout:  # the banner names the health URL (port 0 → a free port)
            if "health at " in line:
                url = line.split("health at ", 1)[1].split()[0]
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        deadline = time.monotonic() + 10
        while status_of(seed, task_id) is not TaskStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status_of(seed, task_id) is TaskStatus.RUNNING
        result = CliRunner().invoke(agent_app, ["status", "--url", url, "--json"])
        assert result.exit_code == 0, result.output
        body = json.loads(result.output)
        assert body["identity"]["machine_id"] == "mac5"
        assert [t["task_id"] for t in body["active_tasks"]] == [task_id]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stdout.read()
        assert {m.machine_id: m.status for m in seed.machines()}["mac5"] == "left"
        assert status_of(seed, task_id) is TaskStatus.QUEUED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        kill_server(libtmux.Server(socket_name=socket))


def test_typed_task_tells_the_agent_how_to_end_without_ending_itself():
    from fleet.mesh.store import QueuedTask

    task = QueuedTask(
        task_id="t42", kind="skill", command=["/creative:forge", "app-1"], created_at=utcnow()
    )
    line = task_text(task)
    assert line.startswith("TASK t42 /creative:forge app-1") and "DONE" in line
    section = task_section(line + "\n", "t42")
    assert finished(section, "t42") is None  # the echo of the instruction is not an end marker
    assert finished(section + "result\nDONE t42\n", "t42") == (TaskStatus.DONE, "result")


def test_a_crash_looping_pane_is_quarantined_and_released_by_its_probe(make_agent, store, clock):
    from fleet.mesh.immune import ImmunePolicy, Subject, Tier
    from fleet.mesh.immune_feed import run_cycle

    settings = FleetSettings(agent_panes=2, mesh_id="")
    policy = ImmunePolicy.from_settings(settings)
    agent = make_agent(settings=settings)
    crash = store.enqueue("skill", ["exit", "now"], clock.now())  # the pane's agent dies on it
    tick_until(agent, lambda: status_of(store, crash) is TaskStatus.FAILED, timeout=20)
    crashed = store.get_task(crash).pane_id
    pane = Subject.pane("mac3", crashed)
    assert run_cycle(store, clock.now(), policy).states[pane].tier == Tier.HARD

    # Excluded: new work goes to the other pane.
    busy = store.enqueue("skill", ["hang", "busy"], clock.now())
    clock.advance(settings.claim_seconds)
    tick_until(agent, lambda: status_of(store, busy) is TaskStatus.RUNNING)
    assert store.get_task(busy).pane_id != crashed

    # The exclusion ends: the next task is the crashed pane's probe, and it succeeds.
    clock.advance(policy.exclusion(1).total_seconds())
    probe = store.enqueue("skill", ["probe"], clock.now())
    tick_until(agent, lambda: status_of(store, probe) is TaskStatus.DONE, timeout=15)
    assert store.get_task(probe).pane_id == crashed
    assert run_cycle(store, clock.now(), policy).states[pane].tier == Tier.INNATE
    assert [e["action"] for e in store.immune_events(str(pane))][-1] == "release"


def test_a_rate_limit_requeues_without_an_attempt_and_backs_the_account_off(
    make_agent, store, clock
):
    agent = make_agent(account="claude-a")
    task_id = store.enqueue(
        "skill", ["fail", "Claude", "usage", "limit", "reached|1893456000"], clock.now()
    )
    tick_until(agent, lambda: status_of(store, task_id) is TaskStatus.QUEUED and not agent.tasks)
    task = store.get_task(task_id)
    assert task.attempts == 0 and store.events(task_id)[-1].detail["reason"] == "rate_limited"
    [account] = store.immune_states("account")
    assert str(account.subject) == "account:claude-a" and account.backing_off(clock.now())
    clock.advance(SETTINGS.claim_seconds * 3)
    for _ in range(5):
        agent.tick()
    assert status_of(store, task_id) is TaskStatus.QUEUED  # backing off: not claimed again


def test_metabolism_paces_empty_claims_between_30_and_300_seconds(make_agent, store, clock):
    settings = FleetSettings(agent_panes=1, mesh_id="", agent_metabolism_pacing=True)
    agent = make_agent(settings=settings)
    assert agent.claim_interval(clock.now(), claimed=True) == settings.claim_seconds
    assert agent.claim_interval(clock.now(), claimed=False) == 300  # nothing seen: quiet
    for _ in range(3):
        task_id = store.enqueue("skill", ["work"], clock.now())
        clock.advance(settings.claim_seconds)
        tick_until(agent, lambda t=task_id: status_of(store, t) is TaskStatus.DONE)
    busy = agent.claim_interval(clock.now(), claimed=False)
    assert 30 <= busy < 300


@pytest.mark.parametrize("corrective", ["retry", "respawn_pane"])
def test_a_learned_corrective_is_applied_first_mesh_wide(
    make_agent, any_store, clock, tmp_path, corrective
):
    from fleet.mesh.immune import ImmunePolicy, failure_signature
    from fleet.mesh.immune_feed import run_cycle

    why = "disk full on the build volume"
    sig = failure_signature(why)
    for _ in range(2):  # learned elsewhere in the mesh: this failure is cured by `corrective`
        any_store.record_antibody(sig, corrective, True, clock.now())
    agent = make_agent(agent_store=any_store)
    marker = tmp_path / "failed-once"
    task_id = any_store.enqueue("skill", ["flaky", str(marker), *why.split()], clock.now())

    def done() -> bool:
        clock.advance(SETTINGS.claim_seconds)  # a requeued task is claimed at the next round
        return status_of(any_store, task_id) is TaskStatus.DONE

    tick_until(agent, done, timeout=20)
    assert marker.exists()  # it did fail once
    [applied] = any_store.events(task_id, event="AntibodyApplied")
    assert (applied.detail["signature"], applied.detail["corrective"]) == (sig, corrective)
    assert "failed" not in event_names(any_store, task_id)
    assert any_store.get_task(task_id).attempts == 0
    # The immune system credits the corrective the agent applied, for the next machine.
    run_cycle(any_store, clock.now(), ImmunePolicy.from_settings(SETTINGS))
    bodies = {(a.signature, a.corrective): a for a in any_store.antibodies()}
    assert bodies[(sig, corrective)].successes > 2


def test_a_learned_corrective_is_applied_once_per_task(make_agent, any_store, clock):
    from fleet.mesh.immune import failure_signature

    why = "segfault in the linker"
    for _ in range(2):
        any_store.record_antibody(failure_signature(why), "retry", True, clock.now())
    agent = make_agent(agent_store=any_store)
    task_id = any_store.enqueue("skill", ["fail", *why.split()], clock.now())

    def failed() -> bool:
        clock.advance(SETTINGS.claim_seconds)
        return status_of(any_store, task_id) is TaskStatus.FAILED

    tick_until(agent, failed, timeout=20)  # retried once, then it fails for real
    assert len(any_store.events(task_id, event="AntibodyApplied")) == 1
    assert event_names(any_store, task_id).count("claimed") == 2
