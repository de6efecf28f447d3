"""MeshDispatcher: the pipeline's Dispatcher on the mesh queue, a real node agent doing the work."""

from __future__ import annotations

import shutil
import time
import uuid

import libtmux
import pytest

from fleet.clients.base import Dispatcher
from fleet.clock import ManualClock
from fleet.errors import DispatchError, DispatchTimeout, UnknownTask
from fleet.mesh.agent import NodeAgent
from fleet.mesh.dispatcher import MeshDispatcher
from fleet.mesh.open import open_mesh_store
from fleet.mesh.store import MachineIdentity, TaskStatus
from fleet.mesh.tmux import PaneControl
from fleet.settings import FleetSettings
from tests.mesh.test_tmux import SCRIPTED, kill_server


class AgentDrivenClock(ManualClock):
    """While the dispatcher sleeps, time jumps and the node agents work (a tiny real wait lets
    tmux deliver the panes' output)."""

    def __init__(self):
        super().__init__()
        self.agents: list[NodeAgent] = []

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        for agent in self.agents:
            agent.tick()
        time.sleep(0.02)


@pytest.fixture
def store(tmp_path):
    return open_mesh_store(f"sqlite:///{tmp_path / 'mesh.db'}")


@pytest.fixture
def clock() -> AgentDrivenClock:
    return AgentDrivenClock()


@pytest.fixture
def agent(store, clock, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("needs a tmux binary")
    server = libtmux.Server(socket_name=f"fleet-test-{uuid.uuid4().hex[:10]}")
    node = NodeAgent(
        MachineIdentity(machine_id="mac3", mesh_id="prod"),
        store,
        PaneControl(server),
        clock=clock,
        settings=FleetSettings(agent_panes=1),
        agent_command=SCRIPTED,
        state_path=tmp_path / "agent.json",
    )
    clock.agents.append(node)
    yield node
    kill_server(server)


def test_it_is_a_dispatcher(store, clock):
    assert isinstance(MeshDispatcher(store, clock, 1), Dispatcher)
    with pytest.raises(ValueError):
        MeshDispatcher(store, clock, 0)


@pytest.mark.tmux
async def test_dispatch_round_trip_through_a_node_agent(store, clock, agent):
    dispatcher = MeshDispatcher(store, clock, poll_seconds=1)
    task_id = await dispatcher.dispatch(["evolve", "app-1"], target="mac3", model="claude")
    queued = store.get_task(task_id)
    assert (queued.status, queued.target, queued.model, queued.command) == (
        TaskStatus.QUEUED,
        "mac3",
        "claude",
        ["evolve", "app-1"],
    )

    assert (
        await dispatcher.poll_and_retrieve(task_id, timeout=600) == f"OUTPUT {task_id} evolve app-1"
    )
    assert store.get_task(task_id).claimed_by == "mac3"
    assert clock.sleeps and sum(clock.sleeps) < 600


@pytest.mark.tmux
async def test_spawn_goes_to_any_worker(store, clock, agent):
    dispatcher = MeshDispatcher(store, clock, poll_seconds=1)
    task_id = await dispatcher.spawn(["review", "app-2"])
    assert store.get_task(task_id).target is None
    assert (
        await dispatcher.poll_and_retrieve(task_id, timeout=600) == f"OUTPUT {task_id} review app-2"
    )


@pytest.mark.tmux
async def test_failed_task_raises_dispatch_error_with_the_reason(store, clock, agent):
    dispatcher = MeshDispatcher(store, clock, poll_seconds=1)
    task_id = await dispatcher.spawn(["fail", "tests", "red"])
    with pytest.raises(DispatchError, match=r"failed on mac3 .*tests red") as info:
        await dispatcher.poll_and_retrieve(task_id, timeout=600)
    assert not isinstance(info.value, DispatchTimeout)


@pytest.mark.tmux
async def test_task_targeted_elsewhere_times_out_on_the_injected_clock(store, clock, agent):
    dispatcher = MeshDispatcher(store, clock, poll_seconds=7)
    task_id = await dispatcher.dispatch(["evolve", "app-3"], target="mac4", model="claude")
    with pytest.raises(DispatchTimeout, match=r"still queued after 30s \(no worker claimed it"):
        await dispatcher.poll_and_retrieve(task_id, timeout=30)
    assert sum(clock.sleeps) == pytest.approx(30)  # 7+7+7+7+2: never past the deadline
    assert store.get_task(task_id).status is TaskStatus.QUEUED  # mac3 did not take mac4's work


async def test_dead_lettered_task_raises_dispatch_error(store):
    clock = ManualClock()
    dispatcher = MeshDispatcher(store, clock, poll_seconds=1)
    task_id = await dispatcher.spawn(["evolve", "app-4"])
    store.heartbeat(MachineIdentity(machine_id="mac9", mesh_id="prod"), clock.now(), None, [])
    assert [t.task_id for t in store.claim("mac9", clock.now())] == [task_id]
    store.mark_down("mac9", clock.now(), max_attempts=0)
    with pytest.raises(DispatchError, match="dead_letter"):
        await dispatcher.poll_and_retrieve(task_id, timeout=60)
    assert clock.sleeps == []  # a finished task is answered at once


async def test_unknown_task_and_bad_commands(store):
    dispatcher = MeshDispatcher(store, ManualClock(), poll_seconds=1)
    with pytest.raises(UnknownTask, match="not in the queue"):
        await dispatcher.poll_and_retrieve("nope", timeout=5)
    with pytest.raises(DispatchError, match="argument list"):
        await dispatcher.spawn("rm -rf /")
    with pytest.raises(DispatchError, match="empty command"):
        await dispatcher.spawn([])
    with pytest.raises(DispatchError, match="target machine"):
        await dispatcher.dispatch(["x"], target="", model="claude")
