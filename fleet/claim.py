"""The claim: one run's hold on one app — taken, renewed, fencing every write, let go."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from fleet.clients.base import Dispatcher, Extractor, GateStatus, QualityGate
from fleet.clock import Clock
from fleet.errors import AgentFailed, DispatchTimeout, StageFailed, StaleLease, UnknownTask
from fleet.fleetfile import AppSpec, FleetFile, render
from fleet.inflight import dead_on_this_host, in_flight, owner_id, steal_from
from fleet.ledger import measured
from fleet.models import EvolutionState, Stage, Task
from fleet.procs import APP_RUN_MARKER, current_app_run, kill_by_env
from fleet.settings import FleetSettings
from fleet.store.base import Effect, EffectKind, Store, effect_key
from fleet.store.outage import through_outages
from fleet.wiring import Components

log = logging.getLogger("fleet.claim")
T = TypeVar("T")


@dataclass
class AppRun:
    """One run's hold on one app: its claim epoch, its collaborators and what it measured.

    Every stage write carries the epoch (a run that lost the app writes nothing) and renews
    the lease; `renew` does only the latter, for waits longer than a lease.
    """

    app: AppSpec
    fleet: FleetFile
    run_id: str
    epoch: int
    store: Store
    dispatcher: Dispatcher
    gate: QualityGate
    extractor: Extractor | None
    settings: FleetSettings
    clock: Clock
    durations: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: GateStatus | None = None
    shipped: bool = False
    # Put into the environment of every agent started for this run, and recorded (per epoch)
    # before the first one starts: the next run's `take` stops them all after a crash.
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    marker_recorded: bool = False
    # The app's effects as the store held them when this run took the app, kept up to date
    # by `record_effect`: only the claim's holder records them (fenced), so reading them
    # again costs a round trip per agent start for nothing. None: read the store each time.
    effects: dict[str, Effect] | None = None
    # The stage `take` read while claiming the app (None where it was just reset): the
    # claim keeps anyone else from moving it, so the stages start from it without a read.
    taken_stage: Stage | None = None

    @property
    def app_id(self) -> str:
        return self.app.id

    def state(self) -> EvolutionState:
        state = self.store.get_state(self.app_id)
        assert state is not None, "claimed apps always have a state row"
        return state

    def set_stage(self, stage: Stage, error: str | None = None) -> EvolutionState:
        """Every stage write carries the claim epoch and renews the claim's lease."""
        return self.store.set_stage(
            self.app_id,
            stage,
            self.epoch,
            self.clock.now(),
            error=error,
            lease_seconds=self.settings.app_lease_seconds,
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call off the event loop. A store outage pauses this app (one log line per
        outage, backoff on the clock) and the call goes on when the store is back; past
        `store_outage_budget_seconds` it raises StoreOutage, a clean resumable failure."""
        result: T = await through_outages(
            self.settings, self.clock, f"app {self.app_id}", fn, *args
        )
        return result

    async def astate(self) -> EvolutionState:
        return await self.call(self.state)

    async def starting_stage(self) -> Stage:
        """The stage this run's stages start from."""
        if self.taken_stage is not None:
            return self.taken_stage
        return (await self.astate()).stage

    async def enter(self, stage: Stage, error: str | None = None) -> EvolutionState:
        """`set_stage` from a coroutine: a short store write, off the event loop."""
        return await self.call(self.set_stage, stage, error)

    def renew_claim(self) -> None:
        """Prove this run still holds the app and extend its lease, keeping the stage: one
        store round trip (`renew_claim`).

        Raises StaleLease when another run took the app: the caller stops before it acts.
        """
        now, lease = self.clock.now(), self.settings.app_lease_seconds
        if not self.store.renew_claim(self.app_id, self.epoch, now, lease):
            raise StaleLease(
                f"renewing the claim on {self.app_id} refused: epoch {self.epoch} no "
                "longer owns it; another run has taken the app or the claim was released"
            )

    async def renew(self) -> None:
        """`renew_claim` from a coroutine, off the event loop."""
        await self.call(self.renew_claim)

    async def conclude(self, tasks: Iterable[Task], stage: Stage) -> EvolutionState:
        """A stage's tasks and the stage they complete, in one trip off the event loop (89
        apps ending a stage together queue every trip behind each other's): the claim is
        renewed first (fenced: a run that lost the app writes no tasks), then the tasks are
        upserted and the stage written. Repeated after an outage, it writes the same rows
        and the same stage again."""
        tasks = list(tasks)

        def write() -> EvolutionState:
            self.renew_claim()
            self.store.upsert_tasks(tasks, self.clock.now())
            return self.set_stage(stage)

        return await self.call(write)

    async def get_effect(self, key: str) -> Effect | None:
        if self.effects is not None:
            return self.effects.get(key)
        return await self.call(self.store.get_effect, self.app_id, key)

    async def record_effect(self, key: str, kind: EffectKind, value: str) -> str:
        """Record an effect under this claim (fenced); the first value recorded wins."""
        (value,) = await self.record_effects([(key, kind, value)])
        return value

    async def record_effects(self, effects: list[tuple[str, EffectKind, str]]) -> list[str]:
        """Record (key, kind, value) effects under this claim (fenced) in one trip off the
        event loop; under each key the first value recorded wins, and is returned."""
        now = self.clock.now()

        def write() -> list[str]:
            return [
                self.store.record_effect(self.app_id, key, kind, value, self.epoch, now)
                for key, kind, value in effects
            ]

        values = await self.call(write)
        for (key, kind, _), value in zip(effects, values, strict=True):
            if self.effects is not None and key not in self.effects:
                self.effects[key] = Effect(
                    app_id=self.app_id,
                    key=key,
                    kind=kind,
                    value=value,
                    epoch=self.epoch,
                    created_at=now,
                )
        return values

    def effect_key(self, stage: str, attempt: int) -> str:
        return effect_key(self.app_id, stage, attempt)

    def marker_effect(self) -> tuple[str, EffectKind, str]:
        """This run's agent marker, as an effect under its epoch (every run's is kept)."""
        return self.effect_key(APP_RUN, self.epoch), "marker", self.marker

    async def release(self) -> None:
        await self.call(self.store.release_app, self.app_id, self.epoch)

    def command(self, template: list[str], prompt: str = "") -> list[str]:
        return render(
            template,
            app_id=self.app_id,
            pipeline=self.app.pipeline,
            repo=str(self.app.repo or ""),
            prompt=prompt,
        )

    def add_duration(self, stage: str, started: datetime) -> None:
        self.durations[stage] = round(
            self.durations.get(stage, 0.0) + (self.clock.now() - started).total_seconds(), 3
        )


# EFFECTS (exactly once) ------------------------------------------------------------------
SPENT = "spent:"  # prefix of the marker saying the task under a key ended without an answer
ACCEPTED = "evolve-accepted"  # the marker of an evolve whose quality gate passed
EVOLUTION = "evolution"  # the nonce that makes one evolution's gateway keys its own
APP_RUN = "app-run"  # the stage of the agent marker each run records, its epoch as the attempt

Start = Callable[[str], Awaitable[str]]  # starts the task under an idempotency key: its id


async def live_key(run: AppRun, stage: str, attempt: int) -> tuple[str, Effect | None]:
    """The key of (stage, attempt)'s live effect and what is recorded under it.

    A task that ended without a usable answer (failed, timed out, forgotten by the
    dispatcher) is marked spent; the next start of the same attempt is a restart with a
    key of its own (`skill+1`, …), so a gateway that dedupes keys does not hand back the
    spent task. Every key stays derived from (app, stage, attempt, restart): no epoch.
    """
    restart = 0
    while True:
        key = run.effect_key(stage if restart == 0 else f"{stage}+{restart}", attempt)
        effect = await run.get_effect(key)
        if effect is None or await run.get_effect(SPENT + key) is None:
            return key, effect
        restart += 1


async def start_once(
    run: AppRun, stage: str, attempt: int, kind: EffectKind, start: Start
) -> tuple[str, str, bool]:
    """(key, task id, whether an earlier run had started it): a task recorded under the
    key is reused; otherwise it is started with the key as its idempotency key and recorded
    at once, before anyone waits on it. A crash between the start and the record is absorbed
    by the gateway (same key, same task)."""
    key, effect = await live_key(run, stage, attempt)
    if effect is not None:
        log.info(
            "%s: %s attempt %d already started as task %s: polling it, not starting again",
            run.app_id,
            stage,
            attempt,
            effect.value,
        )
        return key, effect.value, True
    sent = await gateway_key(run, key)  # after it, this run's marker is recorded
    token = current_app_run.set(run.marker)
    try:
        task_id = await start(sent)
    finally:
        current_app_run.reset(token)
    return key, await run.record_effect(key, kind, task_id), False


async def gateway_key(run: AppRun, key: str) -> str:
    """The `Idempotency-Key` sent for the effect `key`: the key plus this evolution's nonce.

    The effect key alone comes again after `fleet reset` / `fresh` / a retried failure (the
    app's effects are cleared, the same stage and attempt recur) and in another fleet with
    the same app ids on the same gateway, which would hand back an old task. The nonce is
    recorded once per evolution (the first value wins, so a resumed run sends the same key)
    and cleared with the rest of the app's effects.

    This run's agent marker (every run's is kept, under its epoch) is recorded with it, in
    the same trip, before the run's first agent exists: a crash cannot orphan the agent.
    """
    evolution = run.effect_key(EVOLUTION, 1)
    recorded = await run.get_effect(evolution)
    writes: list[tuple[str, EffectKind, str]] = []
    if not run.marker_recorded:
        writes.append(run.marker_effect())
    if recorded is None:
        writes.append((evolution, "marker", uuid.uuid4().hex[:16]))
    values = await run.record_effects(writes) if writes else []
    run.marker_recorded = True
    nonce = recorded.value if recorded else values[-1]
    return f"{key}/{nonce}"


async def spend(run: AppRun, key: str, task_id: str) -> None:
    await run.record_effect(SPENT + key, "marker", task_id)


async def run_once(
    run: AppRun, stage: str, attempt: int, kind: EffectKind, start: Start, timeout: float
) -> str:
    """Start (at most once) the task of (stage, attempt) and await its output."""
    while True:
        started = run.clock.now()
        key, task_id, resumed = await start_once(run, stage, attempt, kind, start)
        try:
            # Every try goes to the cost and work ledger, answered or not, under the task's
            # key without its restarts: tries of one task add up as its attempts.
            answer = run.dispatcher.poll_and_retrieve(task_id, timeout)
            return await measured(run, stage, run.effect_key(stage, attempt), started, answer)
        except UnknownTask:
            if kind == "ship":  # its upload may have happened: never send a second one
                raise StageFailed(
                    f"the ship task {task_id} is unknown to the dispatcher; not uploading again "
                    "(check TestFlight, then `fleet reset` the app to ship anew)"
                ) from None
            await spend(run, key, task_id)
            if resumed:  # a dead run's task the dispatcher forgot (it restarted): start anew
                run.notes.append(f"{stage} task {task_id} of a dead run was gone: started again")
                continue
            raise
        except AgentFailed:  # ended without an answer: a retry starts a fresh task
            await spend(run, key, task_id)
            raise
        except DispatchTimeout:
            # The local executor stopped it; a timed-out upload may have gone through, so
            # only a timed-out agent (not a ship) is started afresh by the next try.
            if kind != "ship":
                await spend(run, key, task_id)
            raise


@dataclass(frozen=True)
class NotClaimed:
    """Why this run did not take the app ("in flight elsewhere", "already complete", …)."""

    note: str


def take(comp: Components, app_id: str, run_id: str, fresh: bool = False) -> AppRun | NotClaimed:
    """Claim the app for this run and decide, while holding it, whether there is work.

    A run that just finished the app must not be followed by a second pass over it, so a
    terminal stage is only started again with `fresh`.
    """
    run = claim(comp, app_id, run_id)
    if run is None:
        return NotClaimed(not_claimed_note(comp, app_id))
    run.effects = {e.key: e for e in stop_earlier_agents(comp.store, app_id, run.epoch)}
    stage = run.state().stage
    if not stage.terminal:
        run.taken_stage = stage
        return run
    if not fresh:
        comp.store.release_app(app_id, run.epoch)
        return NotClaimed(f"already {stage.value}")
    comp.store.reset_app(app_id, comp.clock.now())
    return claim(comp, app_id, run_id) or NotClaimed(not_claimed_note(comp, app_id))


async def take_waiting_out_outages(
    comp: Components, app_id: str, run_id: str, fresh: bool = False
) -> AppRun | NotClaimed:
    """`take` off the event loop, pausing through a store outage like every other store call
    of an app run (past `store_outage_budget_seconds`: StoreOutage, a clean failure). A claim
    that committed just before the cut finds the app held by this run's own claim when it is
    repeated: the app is then reported in flight and its short lease frees it for the next run."""
    run: AppRun | NotClaimed = await through_outages(
        comp.settings, comp.clock, f"app {app_id}", take, comp, app_id, run_id, fresh
    )
    return run


def stop_earlier_agents(store: Store, app_id: str, epoch: int) -> list[Effect]:
    """Kill every agent (on this host) that an earlier claim of the app started: a run that
    died left them editing the repo, and what they write must not reach the next snapshot.
    Returns the app's effects, read for it."""
    effects = store.list_effects(app_id)
    markers = [
        e.value
        for e in effects
        if e.kind == "marker" and e.key.startswith(APP_RUN + "/") and e.epoch < epoch
    ]
    if markers:
        kill_by_env(APP_RUN_MARKER, *markers)
    return effects


def claim(comp: Components, app_id: str, run_id: str) -> AppRun | None:
    """Take the app for this run, or None when another live run holds it or `max_concurrent`
    apps are in flight (checked in the same step, so overlapping cohort runs and workers on
    other machines cannot exceed it)."""
    store, now = comp.store, comp.clock.now()
    store.ensure_apps([app_id], now)
    held = store.get_state(app_id)
    epoch = store.claim_app(
        app_id,
        owner_id(),
        run_id,
        now,
        comp.settings.app_lease_seconds,
        steal_from=steal_from(held, now, dead_on_this_host) if held else None,
        max_in_flight=max_concurrent(comp),
    )
    if epoch is None:
        return None
    return AppRun(
        app=comp.fleet.app(app_id),
        fleet=comp.fleet,
        run_id=run_id,
        epoch=epoch,
        store=store,
        dispatcher=comp.dispatcher,
        gate=comp.gate,
        extractor=comp.extractor,
        settings=comp.settings,
        clock=comp.clock,
    )


def max_concurrent(comp: Components) -> int:
    """The live limit, by fleet/config_sources.py's rule: pinned by the environment or the
    FleetConfig block, else the store's fleet config (`fleet config set-max-concurrent`, the
    dashboard; read at every claim), else the default."""
    if "max_concurrent" in comp.pinned:
        return comp.settings.max_concurrent
    return comp.store.get_fleet_config().max_concurrent or comp.settings.max_concurrent


def not_claimed_note(comp: Components, app_id: str) -> str:
    state = comp.store.get_state(app_id)
    if state and in_flight(state, comp.clock.now(), dead_on_this_host):
        return "in flight elsewhere"
    return f"waiting (max_concurrent={max_concurrent(comp)})"
