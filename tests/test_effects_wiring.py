"""Exactly-once effects through the stages: real SQLite, the local executor, simulated kills."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from fleet.claim import ACCEPTED, APP_RUN, EVOLUTION, AppRun, take
from fleet.clients.local import LocalExecutor
from fleet.clock import ManualClock
from fleet.errors import AgentFailed, StageFailed, StaleLease
from fleet.models import Stage
from fleet.pipeline import parse_skill, run_evolve, run_review, run_ship, run_skill
from fleet.store.base import effect_key
from fleet.store.outage import StoreOutage
from fleet.store.refusals import StoreUnreachable
from tests.helpers import advance, app_run, demo_fleet, run_components, script

STAGE_WORDS = ("skill", "review", "evolve", "ship")  # the demo agent's first argument


class Killed(BaseException):
    """The orchestrator dying: nothing after it runs (not an Exception, like SystemExit)."""


class Gateway:
    """The protocol as the gateway keeps it: tasks outlive the orchestrator, a repeated
    idempotency key gets the same task back. Starts are counted per kind of command."""

    def __init__(self, workdir: Path):
        self.local = LocalExecutor(workdir=workdir)
        self.by_key: dict[str, str] = {}
        self.outputs: dict[str, str] = {}
        self.starts: list[str] = []  # the command's stage word, per real start
        self.kill_on_poll: set[str] = set()  # stage words whose first poll kills the orchestrator
        self.task_stage: dict[str, str] = {}

    async def _start(self, command: list[str], key: str | None, target: str, model: str) -> str:
        if key is not None and key in self.by_key:
            return self.by_key[key]
        task_id = await self.local.dispatch(command, target=target, model=model)
        stage = next((w for w in command if w in STAGE_WORDS), command[0])
        self.starts.append(stage)
        self.task_stage[task_id] = stage
        if key is not None:
            self.by_key[key] = task_id
        return task_id

    async def spawn(self, command: list[str], idempotency_key: str | None = None) -> str:
        return await self._start(command, idempotency_key, "local", "")

    async def dispatch(
        self, command: list[str], target: str, model: str, idempotency_key: str | None = None
    ) -> str:
        return await self._start(command, idempotency_key, target, model)

    async def poll_and_retrieve(self, task_id: str, timeout: float) -> str:
        stage = self.task_stage[task_id]
        if stage in self.kill_on_poll:
            self.kill_on_poll.discard(stage)
            raise Killed(stage)
        if task_id not in self.outputs:  # the gateway keeps a finished task's answer
            self.outputs[task_id] = await self.local.poll_and_retrieve(task_id, timeout)
        return self.outputs[task_id]


def resumed(run: AppRun, dispatcher=None) -> AppRun:
    """The run that takes the app after `run` died: a new claim (epoch), the same store."""
    store, now = run.store, run.clock.now()
    store.release_app(run.app_id, run.epoch)
    epoch = store.claim_app(run.app_id, "test:2", "run-2", now, run.settings.app_lease_seconds)
    assert epoch is not None and epoch != run.epoch
    return AppRun(
        app=run.app,
        fleet=run.fleet,
        run_id="run-2",
        epoch=epoch,
        store=store,
        dispatcher=dispatcher or run.dispatcher,
        gate=run.gate,
        extractor=None,
        settings=run.settings,
        clock=run.clock,
    )


def builds(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "demo" / "repos" / "dist").glob("demo-calc-*.tar.gz"))


def gateway_run(tmp_path: Path) -> tuple[AppRun, Gateway]:
    run = app_run(tmp_path, demo_fleet(tmp_path), clock=ManualClock())
    gateway = Gateway(tmp_path / "gw")
    run.dispatcher = gateway
    return run, gateway


async def test_a_kill_after_the_ship_dispatch_was_recorded_never_ships_twice(tmp_path):
    run, gateway = gateway_run(tmp_path)
    await run_review(run, await run_skill(run))
    await run_evolve(run)
    gateway.kill_on_poll.add("ship")
    with pytest.raises(Killed):
        await run_ship(run)
    assert run.state().stage is Stage.HYDRA_BUILD  # `complete` was never written
    again = resumed(run)
    await run_evolve(again)  # the gate had passed: not evolved again
    await run_ship(again)
    assert again.state().stage is Stage.COMPLETE and again.shipped
    assert gateway.starts.count("ship") == 1 and gateway.starts.count("evolve") == 1
    ships = [e for e in run.store.list_effects("demo-calc") if e.kind == "ship"]
    assert len(ships) == 1 and ships[0].key == effect_key("demo-calc", "ship", 1)
    assert len(builds(tmp_path)) == 1
    assert any("not run again" in n for n in again.notes)


async def test_a_resume_after_the_skill_spawn_was_recorded_polls_the_same_task(tmp_path):
    run, gateway = gateway_run(tmp_path)
    gateway.kill_on_poll.add("skill")
    with pytest.raises(Killed):
        await run_skill(run)
    recorded = run.store.get_effect("demo-calc", effect_key("demo-calc", "skill", 1))
    assert recorded is not None and recorded.kind == "spawn"
    again = resumed(run)
    tasks = await run_skill(again)
    assert len(tasks) >= 3 and gateway.starts.count("skill") == 1
    # The key the gateway was sent: the effect key and this evolution's nonce.
    [sent] = [k for k in gateway.by_key if k.startswith(recorded.key + "/")]
    assert gateway.by_key[sent] == recorded.value


async def test_a_dead_runs_task_the_local_executor_forgot_is_started_again(tmp_path):
    """A new orchestrator process has a new local executor: the recorded task is gone, so
    (skill being safe to repeat) it is marked spent and started under a restart key."""
    run = app_run(tmp_path, demo_fleet(tmp_path))
    key = effect_key("demo-calc", "skill", 1)
    run.store.record_effect("demo-calc", key, "spawn", "gone123", run.epoch, run.clock.now())
    tasks = await run_skill(resumed(run, LocalExecutor(workdir=tmp_path / "exec2")))
    assert len(tasks) >= 3
    keys = {e.key for e in run.store.list_effects("demo-calc")}
    assert {key, "spent:" + key, effect_key("demo-calc", "skill+1", 1)} <= keys


async def test_a_forgotten_ship_task_fails_cleanly_and_uploads_nothing(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    advance(run, Stage.HYDRA_BUILD)
    key = effect_key("demo-calc", "ship", 1)
    run.store.record_effect("demo-calc", key, "ship", "gone123", run.epoch, run.clock.now())
    with pytest.raises(StageFailed, match="not uploading again"):
        await run_ship(resumed(run, LocalExecutor(workdir=tmp_path / "exec2")))
    assert builds(tmp_path) == []


async def test_a_failed_agent_is_spent_so_the_retry_starts_a_fresh_task(tmp_path):
    flag = tmp_path / "failed-once"
    fail_once = script(
        tmp_path,
        "fail_once",
        "import os, pathlib, sys\n"
        f"p = pathlib.Path({str(flag)!r})\n"
        "if not p.exists():\n    p.write_text('x'); sys.exit(3)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n",
    )
    run, gateway = gateway_run(tmp_path)
    demo_skill = run.fleet.commands.skill
    run.fleet = run.fleet.model_copy(
        update={
            "commands": run.fleet.commands.model_copy(update={"skill": [*fail_once, *demo_skill]})
        }
    )
    with pytest.raises(AgentFailed):
        await run_skill(run)
    await run_skill(run)  # what the stage's retry does
    assert gateway.starts.count("skill") == 2
    assert run.store.get_effect("demo-calc", "spent:" + effect_key("demo-calc", "skill", 1))


def test_the_local_executor_accepts_the_idempotency_key():
    for method in (LocalExecutor.spawn, LocalExecutor.dispatch):
        assert "idempotency_key" in inspect.signature(method).parameters


class FlakyStore:
    """The SQLite store behind a link that is cut for the next `down` calls."""

    def __init__(self, store, down: int = 0):
        self.store, self.down, self.refused = store, down, 0

    def __getattr__(self, name: str):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down > 0:
                self.down -= 1
                self.refused += 1
                raise StoreUnreachable("connection refused")
            return attr(*args, **kwargs)

        return call


async def test_a_short_store_outage_pauses_the_stage_then_it_goes_on(tmp_path, caplog):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    advance(run, Stage.HYDRA_BUILD)
    flaky = FlakyStore(run.store)
    run.store = flaky
    flaky.down = 4
    with caplog.at_level(logging.WARNING, logger="fleet.store.outage"):
        await run_ship(run)
    assert run.state().stage is Stage.COMPLETE and flaky.refused == 4
    lines = [r.getMessage() for r in caplog.records if "store unreachable" in r.getMessage()]
    assert len(lines) == 1 and "app demo-calc" in lines[0]
    assert any("store back" in r.getMessage() for r in caplog.records)


async def test_a_store_outage_past_the_budget_is_a_clean_resumable_failure(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    advance(run, Stage.HYDRA_BUILD)
    run.store = FlakyStore(run.store, down=10**6)
    with pytest.raises(StoreOutage, match="past the outage budget of 300 s"):
        await run_ship(run)
    assert run.store.store.get_state("demo-calc").stage is Stage.HYDRA_BUILD
    assert builds(tmp_path) == []  # nothing uploaded while the claim could not be proved


async def test_a_change_the_guard_accepted_is_not_evolved_again_on_resume(tmp_path):
    run, gateway = gateway_run(tmp_path)
    await run_review(run, await run_skill(run))
    await run_evolve(run)
    # The crash: after the guard accepted, before the gate's pass was recorded.
    with run.store._tx() as db:
        db.execute(
            "DELETE FROM app_effects WHERE key = ?",
            (effect_key("demo-calc", "evolve-accepted", 1),),
        )
    again = resumed(run)
    await run_evolve(again)
    assert gateway.starts.count("evolve") == 1
    assert any("change guard had accepted evolve attempt 1" in n for n in again.notes)


async def test_an_outage_past_the_budget_ends_the_app_run_resumable(tmp_path, monkeypatch):
    from flows import app_evolution

    monkeypatch.setattr(app_evolution, "get_run_logger", lambda: logging.getLogger("test"))
    run = app_run(tmp_path, demo_fleet(tmp_path))
    advance(run, Stage.HYDRA_BUILD)
    flaky = FlakyStore(run.store)
    run.store = flaky
    async with app_evolution.holding(run) as outcome:
        flaky.down = 10**6
        await run.renew()
    assert outcome.outage and "past the outage budget" in (outcome.error or "")
    assert flaky.store.get_state("demo-calc").stage is Stage.HYDRA_BUILD  # resumable as is


async def test_a_5xx_on_spawn_is_retried_under_its_key_and_starts_one_task(tmp_path):
    """Against the real gateway dev server: the keyed spawn is resent after a 503 and the
    gateway started the skill once (this replaces test_flows_remote's 'fails clearly and is
    not sent twice', which pinned the unkeyed spawn)."""
    import uuid

    from pydantic import SecretStr

    from fleet.clients.aura import AuraGatewayDispatcher
    from fleet.clients.breaker import CircuitBreaker
    from fleet.devservers.aura import AuraDevServer

    clock = ManualClock()
    run = app_run(tmp_path, demo_fleet(tmp_path), clock=clock)
    token = "t0ken-for-tests"
    with AuraDevServer(token=token, workdir=tmp_path / "gateway") as aura:
        gateway = AuraGatewayDispatcher(
            aura.url,
            token=SecretStr(token),
            clock=clock,
            timeout=5,
            breaker=CircuitBreaker(f"aura-test-{uuid.uuid4().hex[:8]}", 3, 60, clock),
        )
        run.dispatcher = gateway
        aura.set_faults(fail_next=1, fail_status=503)
        try:
            tasks = await run_skill(run)
        finally:
            gateway.close()
        started = aura.tasks()
    assert len(tasks) >= 3 and len(started) == 1
    recorded = run.store.get_effect("demo-calc", effect_key("demo-calc", "skill", 1))
    assert recorded is not None and recorded.value == started[0].task_id


async def test_a_reset_app_starts_new_work_on_a_gateway_that_remembers_keys(tmp_path):
    """`fleet reset` clears the app's effects, so its stages come again with the same
    (stage, attempt): the key sent to the gateway carries this evolution's nonce, or the
    gateway would hand back the old task (and 422 another fleet with the same app ids)."""
    run, gateway = gateway_run(tmp_path)
    await run_skill(run)
    first = dict(gateway.by_key)
    run.store.release_app(run.app_id, run.epoch)
    run.store.reset_app(run.app_id, run.clock.now())
    again = resumed(run)
    await run_skill(again)
    assert gateway.starts.count("skill") == 2  # a new skill ran, not the old one replayed
    assert set(gateway.by_key) - set(first)  # under a key of its own
    # A resume of the same evolution sends the same key: the gateway gives the same task.
    sent = next(iter(set(gateway.by_key) - set(first)))
    nonce = sent.rsplit("/", 1)[1]
    assert all(k.endswith(nonce) for k in set(gateway.by_key) - set(first))


class CountingStore:
    """The SQLite store, each call counted by method: a store round trip on PostgreSQL."""

    def __init__(self, store):
        self.store, self.calls = store, Counter()

    def __getattr__(self, name: str):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return call


async def test_an_apps_stages_cost_few_store_round_trips(tmp_path):
    """Each store call is a round trip on PostgreSQL, and 89 apps leaving a stage together
    queue theirs on the one connection: a renewal is one call, and the effects read when the
    app was taken are not read again before each agent start."""
    first = app_run(tmp_path, demo_fleet(tmp_path))
    first.store.release_app(first.app_id, first.epoch)
    counting = CountingStore(first.store)
    run = take(run_components(first), first.app_id, "run-2")
    assert isinstance(run, AppRun)
    run.store = counting
    await run.renew()
    assert counting.calls == Counter(renew_claim=1)
    counting.calls.clear()
    await run_review(run, await run_skill(run))
    await run_evolve(run)
    await run_ship(run)
    assert counting.calls["get_effect"] == 0
    # skill, review, evolve (guarded, on the demo's repo) and ship: per agent start one
    # effect, one ledger row, one stage write or renewal around it.
    assert sum(counting.calls.values()) <= 28, sorted(counting.calls.items())


def counted_trips(monkeypatch) -> list[str]:
    """Every trip a store call makes to a worker thread and back. 89 apps leaving a stage
    together queue their trips behind each other's, and each way back waits its turn on the
    event loop: a stage's writes that follow one another go as one trip."""
    trips: list[str] = []
    real = asyncio.to_thread

    async def counted(fn, /, *args, **kwargs):
        inner = getattr(fn, "func", fn)
        trips.append(getattr(inner, "__qualname__", type(inner).__name__))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return trips


THREE_TASKS = [{"priority": p, "description": f"Fix thing {p}.", "file": "a.py"} for p in (1, 2, 3)]
SKILL_ANSWER = (
    f"<!-- EVOLUTION_TASKS_START -->{json.dumps(THREE_TASKS)}<!-- EVOLUTION_TASKS_END -->"
)


async def test_parse_saves_the_tasks_and_the_stage_in_one_trip(tmp_path, monkeypatch):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    run.set_stage(Stage.SKILL_RUNNING)
    trips = counted_trips(monkeypatch)
    tasks = await parse_skill(run, SKILL_ANSWER)
    assert tasks is not None and len(tasks) == 3
    assert len(trips) == 1, trips
    assert run.state().stage is Stage.SKILL_COMPLETE
    assert len(run.store.list_tasks(run.app_id, "skill")) == 3


async def test_reviews_issues_and_stage_go_in_one_trip_after_the_agent(tmp_path, monkeypatch):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    run.effects = {}  # as `take` leaves them: read when the app was taken
    prior = await run_skill(run)
    trips = counted_trips(monkeypatch)
    issues = await run_review(run, prior)
    # The stage write before the agent, its recorded start and its ledger row, then the
    # issues, the renewal and the stage write after it together.
    assert len(trips) == 4, trips
    assert run.state().stage is Stage.ADVERSARIAL_COMPLETE
    assert len(run.store.list_tasks(run.app_id, "adversarial")) == len(issues) > 0


async def test_a_run_that_lost_the_app_saves_no_tasks(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    run.set_stage(Stage.SKILL_RUNNING)
    run.store.release_app(run.app_id, run.epoch)
    newer = take(run_components(run), run.app_id, "run-2")
    assert isinstance(newer, AppRun)
    with pytest.raises(StaleLease):
        await parse_skill(run, SKILL_ANSWER)
    assert run.store.list_tasks(run.app_id, "skill") == []
    assert run.store.get_state(run.app_id).stage is Stage.SKILL_RUNNING


async def test_a_runs_first_agent_start_records_its_marker_and_nonce_in_one_trip(
    tmp_path, monkeypatch
):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    run.effects = {}
    trips = counted_trips(monkeypatch)
    await run_skill(run)
    # The stage write; this run's agent marker and the evolution's nonce together; the
    # agent's recorded start and its ledger row; the tasks and the stage.
    assert len(trips) == 5, trips
    recorded = {e.key.split("/")[0] for e in run.store.list_effects(run.app_id)}
    assert {APP_RUN, EVOLUTION} <= recorded
    assert run.effects.keys() == {e.key for e in run.store.list_effects(run.app_id)}


async def test_evolve_reads_the_stage_and_enters_hydra_build_in_one_trip(tmp_path, monkeypatch):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    run.app = run.app.model_copy(update={"repo": None})  # Hydra's path: spawn, then poll
    run.gate.checks[run.app_id] = (["true"], tmp_path)
    advance(run, Stage.ADVERSARIAL_COMPLETE)
    run.effects = {}
    trips = counted_trips(monkeypatch)
    status = await run_evolve(run)
    assert status.is_passing and run.state().stage is Stage.HYDRA_BUILD
    # The stage read and write; the marker and nonce; Hydra's recorded start; the check's
    # sweep for escaped processes; the accepted gate (fenced: a passing poll renews nothing).
    assert len(trips) == 5, trips


async def test_a_passing_poll_of_a_run_that_lost_the_app_records_no_acceptance(tmp_path):
    run = app_run(tmp_path, demo_fleet(tmp_path))
    run.app = run.app.model_copy(update={"repo": None})
    run.gate.checks[run.app_id] = (["true"], tmp_path)
    advance(run, Stage.ADVERSARIAL_COMPLETE)
    passing = run.gate.status

    async def taken_meanwhile(app_id: str):
        run.store.release_app(app_id, run.epoch)  # another run takes the app during the wait
        assert isinstance(take(run_components(run), app_id, "run-2"), AppRun)
        return await passing(app_id)

    run.gate.status = taken_meanwhile  # type: ignore[method-assign]
    with pytest.raises(StaleLease):
        await run_evolve(run)
    assert run.store.get_effect(run.app_id, run.effect_key(ACCEPTED, 1)) is None


async def test_the_stage_read_when_the_app_was_taken_is_not_read_again(tmp_path, monkeypatch):
    first = app_run(tmp_path, demo_fleet(tmp_path))
    advance(first, Stage.SKILL_COMPLETE)
    first.store.release_app(first.app_id, first.epoch)
    run = take(run_components(first), first.app_id, "run-2")
    assert isinstance(run, AppRun)
    trips = counted_trips(monkeypatch)
    assert await run.starting_stage() is Stage.SKILL_COMPLETE
    assert trips == []
