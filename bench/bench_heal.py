"""How fast the mesh heals, printed: detection in heartbeats, time to requeue, MTTR per fault,
false-positive quarantines on a slow-but-healthy mesh, a flaky machine's share of work.

An in-process simulator drives simulated machines (heartbeat 30 s, claim 15 s, two slots each)
over the real mesh store (SQLite by default; `--pg URL` for PostgreSQL) on an injected clock,
with the real watchdog cycle (liveness probe, immune feed) every heartbeat and the real
reconciler every 60 s. The dead-pane figure uses a real node agent in real tmux.

    uv run python bench/bench_heal.py [--pg postgresql://…] [--seed 7] [--no-tmux]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from fleet.clock import ManualClock  # noqa: E402
from fleet.errors import FleetError  # noqa: E402
from fleet.mesh.liveness import LivenessProbe, Reach  # noqa: E402
from fleet.mesh.rules import Thresholds  # noqa: E402
from fleet.mesh.store import MachineIdentity, TaskStatus  # noqa: E402
from fleet.mesh.watchdog import watchdog_cycle  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STEP = 5.0
S = FleetSettings()


@dataclass
class SimMachine:
    machine_id: str
    fail_rate: float = 0.0
    slow: float = 1.0  # task duration multiplier
    late: float = 0.0  # seconds a heartbeat may come late (jitter, < one period)
    slots: int = 2
    alive: bool = True
    running: dict[str, tuple[datetime, int, bool, str]] = field(default_factory=dict)
    next_hb: datetime = T0
    next_claim: datetime = T0
    claims: list[datetime] = field(default_factory=list)

    def step(self, store, now: datetime, rng: random.Random) -> None:
        if not self.alive:
            return
        if now >= self.next_hb:
            store.heartbeat(
                MachineIdentity(machine_id=self.machine_id, mesh_id="bench"),
                now,
                f"sim://{self.machine_id}",
                sorted(self.running),
            )
            self.next_hb = now + timedelta(seconds=S.heartbeat_seconds + rng.uniform(0, self.late))
        for task_id, (finish, seq, ok, _pane) in list(self.running.items()):
            if now >= finish:
                store.transition(task_id, self.machine_id, TaskStatus.RUNNING, now, claim_seq=seq)
                store.transition(
                    task_id,
                    self.machine_id,
                    TaskStatus.DONE if ok else TaskStatus.FAILED,
                    now,
                    claim_seq=seq,
                    **({"output": "ok"} if ok else {"error": "exit 1"}),
                )
                del self.running[task_id]
        if now >= self.next_claim:
            used = {p for *_, p in self.running.values()}
            free = [f"%{i}" for i in range(self.slots) if f"%{i}" not in used]
            for task, pane in zip(store.claim(self.machine_id, now, len(free)), free, strict=False):
                duration = 60 * self.slow * rng.uniform(0.8, 1.2)
                ok = rng.random() >= self.fail_rate
                store.transition(
                    task.task_id,
                    self.machine_id,
                    TaskStatus.INJECTED,
                    now,
                    pane_id=pane,
                    claim_seq=task.claim_seq,
                )
                self.running[task.task_id] = (
                    now + timedelta(seconds=duration),
                    task.claim_seq,
                    ok,
                    pane,
                )
                self.claims.append(now)
            self.next_claim = now + timedelta(seconds=S.claim_seconds)


class Sim:
    def __init__(self, store, machines: list[SimMachine], seed: int):
        self.store, self.machines = store, {m.machine_id: m for m in machines}
        self.clock = ManualClock(T0)
        self.rng = random.Random(seed)
        # The probe's pause between a round's confirmations passes on the simulated clock.
        self.probe = LivenessProbe.from_settings(store, S, check=self._reach, clock=self.clock)
        self.next_watchdog = T0 + timedelta(seconds=S.heartbeat_seconds)
        self.next_reconcile = T0 + timedelta(seconds=60)
        self.n = 0
        self.reports = []

    def _reach(self, url: str) -> Reach:
        m = self.machines.get(url.removeprefix("sim://"))
        return Reach.REACHABLE if m is None or m.alive else Reach.UNREACHABLE

    def fill(self, now: datetime) -> None:
        depth = self.store.queue_stats(now)["depth"]["queued"]
        want = 2 * sum(m.slots for m in self.machines.values())
        for _ in range(max(0, want - depth)):
            self.n += 1
            self.store.enqueue(
                "skill",
                ["claude", "-p", f"/evolve app-{self.n % 13}"],
                now,
                task_id=f"t{self.n:06d}",
            )

    def run(self, seconds: float, on_step=None) -> None:
        end = self.clock.now() + timedelta(seconds=seconds)
        while self.clock.now() < end:
            now = self.clock.advance(STEP)
            # A failing store (store-outage) fails a step, never the simulation: each part
            # tries again on its next step, as a node agent's tick and the deployments do.
            with contextlib.suppress(FleetError):
                self.fill(now)
            for m in self.machines.values():
                with contextlib.suppress(FleetError):
                    m.step(self.store, now, self.rng)
            if now >= self.next_watchdog:
                self.reports.append(watchdog_cycle(self.store, now, S, self.probe))
                self.next_watchdog = now + timedelta(seconds=S.heartbeat_seconds)
            if now >= self.next_reconcile:
                with contextlib.suppress(FleetError):
                    self.store.reconcile(now, **asdict(Thresholds.from_settings(S)))
                    self.next_reconcile = now + timedelta(seconds=60)
            if on_step is not None and on_step(now):
                return


def open_store(pg: str | None, tmp: Path, *, lock_timeout: float | None = None):
    """A fresh mesh store; `lock_timeout` makes a locked store fail fast (store-outage)."""
    if pg:
        import psycopg

        from fleet.mesh.pg_store import PgMeshStore
        from fleet.store.migrations import apply_migrations

        apply_migrations(pg)
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE mesh_task_events, mesh_task_queue, mesh_health, mesh_pane_state, "
                "mesh_immune_state, mesh_antibodies, mesh_immune_events, mesh_event_cursor, "
                "mesh_breaker_state RESTART IDENTITY"
            )
        return PgMeshStore(pg, **({"lock_timeout_seconds": lock_timeout} if lock_timeout else {}))
    from fleet.mesh.sqlite_store import SQLiteMeshStore

    return SQLiteMeshStore(
        tmp / f"heal-{uuid.uuid4().hex[:8]}.db",
        **({"busy_timeout_seconds": lock_timeout} if lock_timeout else {}),
    )


def store_url(pg: str | None, store) -> str:
    return pg or f"sqlite:///{store.path}"


def quarantines(store) -> list[dict]:
    return [e for e in store.immune_events() if e["action"] == "quarantine"]


def dead_machine(pg, tmp, seed: int, phase: float = 0.0) -> dict:
    """Kill m3 `phase` seconds into the 600th-second heartbeat period (its beats are at 5 s past
    each half minute, the watchdog's on the half minute)."""
    store = open_store(pg, tmp)
    sim = Sim(store, [SimMachine(f"m{i}") for i in range(6)], seed)
    sim.run(600 + phase)
    victim = sim.machines["m3"]
    held = set(victim.running)
    victim.alive = False
    died = sim.clock.now()
    marks: dict[str, datetime] = {}

    def watch(now: datetime) -> bool:
        status = next(m.status for m in store.machines() if m.machine_id == "m3")
        if "suspect" not in marks and status in ("suspect", "down"):
            marks["suspect"] = now
        if "down" not in marks and status == "down":
            # When it was declared (the round's second probe comes a spacing after the step).
            marks["down"] = next(
                e.at for e in store.events(event="MachineDown") if e.machine_id == "m3"
            )
        if (
            "down" in marks
            and "requeued" not in marks
            and all(
                store.get_task(t).status is not TaskStatus.CLAIMED
                or store.get_task(t).claimed_by != "m3"
                for t in held
            )
        ):
            marks["requeued"] = max(now, marks["down"])  # mark_down requeues as it declares
        if "requeued" in marks and all(
            store.get_task(t).claimed_by not in (None, "m3")
            or store.get_task(t).status is TaskStatus.DONE
            for t in held
        ):
            marks["running_elsewhere"] = now
            return True
        return False

    sim.run(1800, watch)
    store.close()
    hb = S.heartbeat_seconds
    return {
        "suspect_heartbeats": (marks["suspect"] - died).total_seconds() / hb,
        "detect_heartbeats": (marks["down"] - died).total_seconds() / hb,
        "requeue_after_confirm_s": (marks["requeued"] - marks["down"]).total_seconds(),
        "mttr_s": (marks["running_elsewhere"] - died).total_seconds(),
        "tasks": len(held),
    }


def flaky_machine(pg, tmp, seed: int) -> dict:
    store = open_store(pg, tmp)
    machines = [SimMachine(f"m{i}", fail_rate=0.3 if i == 0 else 0.0) for i in range(10)]
    sim = Sim(store, machines, seed)
    start = sim.clock.now()
    marks: dict[str, datetime] = {}

    def watch(now: datetime) -> bool:
        if "tier1" not in marks:
            st = {str(s.subject): s for s in store.immune_states("machine")}.get("machine:m0")
            if st is not None and st.tier >= 1:
                marks["tier1"] = now
        return False

    sim.run(2 * 3600, watch)
    flaky = machines[0]
    q_at = marks.get("tier1")
    total = [c for m in machines for c in m.claims]

    def share(lo: datetime, hi: datetime) -> float:
        mine = sum(1 for c in flaky.claims if lo <= c < hi)
        all_ = sum(1 for c in total if lo <= c < hi)
        return mine / all_ if all_ else 0.0

    end = sim.clock.now()
    tiers = sorted({e["tier"] for e in quarantines(store) if e["subject"] == "machine:m0"})
    others = [
        e
        for e in quarantines(store)
        if e["subject"].startswith("machine:") and e["subject"] != "machine:m0"
    ]
    store.close()
    return {
        "to_tier1_heartbeats": (q_at - start).total_seconds() / S.heartbeat_seconds
        if q_at
        else None,
        "window_heartbeats": S.immune_window_heartbeats,
        "share_before": share(start, q_at or end),
        "share_after": share(q_at or end, end),
        "tiers_reached": tiers,
        "healthy_machines_quarantined": len(others),
    }


def slow_healthy(pg, tmp, seed: int) -> dict:
    store = open_store(pg, tmp)
    machines = [SimMachine(f"m{i}", slow=5.0, late=25.0) for i in range(8)]
    sim = Sim(store, machines, seed)
    sim.run(2 * 3600)
    q = quarantines(store)
    downs = [e for e in store.events(event="MachineDown")]
    # A requeue is a failed attempt (machine down, orphaned, stuck): none is true here.
    requeues = [e for e in store.events(event="queued") if int(e.detail.get("attempts") or 0)]
    done = store.queue_stats(sim.clock.now())["depth"]["done"]
    store.close()
    return {
        "false_quarantines": len(q),
        "false_downs": len(downs),
        "false_requeues": len(requeues),
        "tasks_done": done,
    }


def store_outage(pg, tmp, seed: int, seconds: float = 60) -> dict:
    """The real store-outage fault (fleet/mesh/chaos.py: the mesh tables locked) for `seconds`
    of simulated time on a healthy 6-machine mesh: when the watchdog notices, how long after the
    lock is released the mesh works again (every heartbeat fresh and a task done), and whether
    the outage was taken for anyone's death (it must not be)."""
    from fleet.mesh.chaos import store_outage as lock_store

    store = open_store(pg, tmp, lock_timeout=0.05)
    sim = Sim(store, [SimMachine(f"m{i}") for i in range(6)], seed)
    sim.run(600)
    fault = lock_store(store_url(pg, store))
    began = sim.clock.now()
    seen = len(sim.reports)
    try:
        sim.run(seconds)
    finally:
        fault.revert()
    reverted = sim.clock.now()
    noticed = next((r.at for r in sim.reports[seen:] if r.errors), None)
    done_before = store.queue_stats(reverted)["depth"]["done"]
    marks: dict[str, datetime] = {}

    def healthy(now: datetime) -> bool:
        fresh = all(
            m.last_heartbeat >= now - timedelta(seconds=S.heartbeat_seconds + STEP)
            for m in store.machines()
        )
        if fresh and store.queue_stats(now)["depth"]["done"] > done_before:
            marks["healthy"] = now
            return True
        return False

    sim.run(600, healthy)
    downs = [e for e in store.events(event="MachineDown") if e.at >= began]
    requeues = [
        e
        for e in store.events(event="queued")
        if e.at >= began and int(e.detail.get("attempts") or 0)
    ]
    quarantined = [e for e in quarantines(store) if e["at"] >= began]
    store.close()
    hb = S.heartbeat_seconds
    return {
        "detect_heartbeats": (noticed - began).total_seconds() / hb if noticed else None,
        "mttr_s": (marks["healthy"] - began).total_seconds() if "healthy" in marks else None,
        "after_revert_s": (marks["healthy"] - reverted).total_seconds()
        if "healthy" in marks
        else None,
        "false_downs": len(downs),
        "false_requeues": len(requeues),
        "false_quarantines": len(quarantined),
    }


def gateway_errors(tmp: Path, seconds: float = 60, every: float = STEP) -> dict:
    """The real gateway-errors fault on the dev AuraGateway (every request 503 until reverted)
    against the real dispatcher and circuit breaker on a simulated clock: a spawn every `every`
    seconds; when the breaker opens, and when a spawn succeeds again."""
    import asyncio

    from fleet.clients.aura import AuraGatewayDispatcher
    from fleet.clients.breaker import CircuitBreaker
    from fleet.devservers.aura import AuraDevServer
    from fleet.mesh.chaos import gateway_errors as fail_gateway

    clock = ManualClock(T0)
    server = AuraDevServer(workdir=tmp / "gw").start()
    breaker = CircuitBreaker(
        f"bench-gw-{uuid.uuid4().hex[:6]}",
        failure_threshold=S.breaker_failure_threshold,
        reset_seconds=S.breaker_reset_seconds,
        clock=clock,
    )
    gw = AuraGatewayDispatcher(server.url, clock=clock, breaker=breaker, timeout=5)

    async def spawn(n: int) -> bool:
        try:
            await gw.spawn(["true"], idempotency_key=f"bench-{n}")
            return True
        except FleetError:
            return False

    async def drive() -> dict:
        n = 0
        for _ in range(3):  # healthy first
            n += 1
            assert await spawn(n), "the dev gateway did not answer before the fault"
            clock.advance(every)
        fault = fail_gateway(server.url)
        began = clock.now()
        opened = recovered = reverted = None
        failed_calls = 0
        while recovered is None and (clock.now() - began).total_seconds() < 30 * 60:
            if reverted is None and (clock.now() - began).total_seconds() >= seconds:
                fault.revert()
                reverted = clock.now()
            n += 1
            ok = await spawn(n)
            failed_calls += not ok
            if opened is None and breaker.state != "closed":
                opened = clock.now()
            if ok:
                recovered = clock.now()
            clock.advance(every)
        fault.revert()
        return {
            "detect_s": (opened - began).total_seconds() if opened else None,
            "mttr_s": (recovered - began).total_seconds() if recovered else None,
            "after_revert_s": (recovered - reverted).total_seconds()
            if recovered and reverted
            else None,
            "failed_calls": failed_calls,
        }

    try:
        return asyncio.run(drive())
    finally:
        asyncio.run(gw.aclose())
        server.stop()


def cpu_spike(tmp: Path, seconds: float = 10.0, rounds: int = 5) -> dict:
    """The real cpu-spike fault (a busy process per core) for `seconds` of wall time under a
    real node agent in real tmux: task round trip (enqueue → done) before, during and after,
    when it is back within 1.5× the baseline after the revert, and what the immune system and
    liveness made of it (a busy machine is not a sick one: nothing must be quarantined)."""
    import libtmux

    from fleet.clock import SystemClock
    from fleet.mesh.agent import NodeAgent
    from fleet.mesh.chaos import cpu_spike as spike
    from fleet.mesh.immune import ImmunePolicy
    from fleet.mesh.immune_feed import run_cycle
    from fleet.mesh.sqlite_store import SQLiteMeshStore
    from fleet.mesh.tmux import PaneControl

    socket = f"fleet-bench-{uuid.uuid4().hex[:8]}"
    server = libtmux.Server(socket_name=socket)
    store = SQLiteMeshStore(tmp / "cpu.db")
    clock = SystemClock()
    settings = FleetSettings(agent_panes=1, claim_seconds=0.2)
    agent = NodeAgent(
        MachineIdentity(machine_id="bench", mesh_id="bench"),
        store,
        PaneControl(server),
        clock=clock,
        settings=settings,
        agent_command=[sys.executable, "-m", "fleet.mesh.scripted_agent"],
        state_path=tmp / "cpu-agent.json",
    )

    def round_trip(n: int) -> float:
        task_id = store.enqueue("skill", ["work", str(n)], clock.now(), task_id=f"cpu{n}")
        t0 = time.monotonic()
        while store.get_task(task_id).status is not TaskStatus.DONE:
            agent.tick()
            if time.monotonic() - t0 > 60:
                raise RuntimeError("a task did not finish within 60 s")
            time.sleep(0.02)
        return time.monotonic() - t0

    n = 0
    try:
        agent.tick()
        while not agent.panes.read_pane(agent.pane_ids[0], 20).strip():
            time.sleep(0.05)
        base = []
        for _ in range(rounds):
            n += 1
            base.append(round_trip(n))
        baseline = statistics.median(base)
        fault = spike()
        began = time.monotonic()
        during = []
        try:
            while time.monotonic() - began < seconds:
                n += 1
                during.append(round_trip(n))
        finally:
            fault.revert()
        reverted = time.monotonic()
        while True:
            n += 1
            took = round_trip(n)
            if took <= 1.5 * baseline or time.monotonic() - reverted > 60:
                break
        back = time.monotonic() - reverted
        cycle = run_cycle(store, clock.now(), ImmunePolicy.from_settings(settings))
    finally:
        with contextlib.suppress(Exception):
            server.kill()
        store.close()
    return {
        "baseline_s": baseline,
        "during_s": statistics.median(during) if during else None,
        "mttr_s": seconds + back,
        "after_revert_s": back,
        "quarantined": len(cycle.quarantined()),
        "cores": len(fault.detail["pids"]),
    }


def dead_pane(tmp: Path, rounds: int = 5) -> dict:
    """A real node agent in real tmux: kill its pane, time until a live agent pane is back."""
    import libtmux

    from fleet.clock import SystemClock
    from fleet.mesh.agent import NodeAgent
    from fleet.mesh.chaos import kill_pane
    from fleet.mesh.sqlite_store import SQLiteMeshStore
    from fleet.mesh.tmux import PaneControl

    socket = f"fleet-bench-{uuid.uuid4().hex[:8]}"
    server = libtmux.Server(socket_name=socket)
    store = SQLiteMeshStore(tmp / "pane.db")
    agent = NodeAgent(
        MachineIdentity(machine_id="bench", mesh_id="bench"),
        store,
        PaneControl(server),
        clock=SystemClock(),
        settings=FleetSettings(agent_panes=1),
        agent_command=[sys.executable, "-m", "fleet.mesh.scripted_agent"],
        state_path=tmp / "agent.json",
    )
    times = []
    try:
        agent.tick()
        for _ in range(rounds):
            while not agent.panes.read_pane(agent.pane_ids[0], 20).strip():
                time.sleep(0.05)  # its agent is up
            [old] = agent.pane_ids
            old_pid = agent.panes.pane(old).pid
            kill_pane(old, socket)
            t0 = time.monotonic()
            while True:
                agent.tick()
                pane = agent.panes.pane(agent.pane_ids[0]) if agent.pane_ids else None
                if (
                    pane is not None
                    and pane.pid != old_pid
                    and agent.panes.is_alive(pane.pane_id)
                    and agent.panes.read_pane(pane.pane_id, 20).strip()
                ):
                    break
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("pane did not come back in 30 s")
                time.sleep(0.05)
            times.append(time.monotonic() - t0)
    finally:
        with contextlib.suppress(Exception):
            server.kill()
        store.close()
    return {"mttr_s_median": statistics.median(times), "mttr_s_max": max(times), "rounds": rounds}


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r[key] is not None]
    return f"{statistics.mean(values):.0f} s mean" if values else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="", help="PostgreSQL URL (the mesh tables are truncated!)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-tmux", action="store_true")
    parser.add_argument(
        "--spike-seconds",
        type=float,
        default=10,
        help="cpu-spike length (wall time; it busies every core of a shared machine)",
    )
    args = parser.parse_args()
    backend = "postgresql" if args.pg else "sqlite"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"bench_heal on {backend}, heartbeat {S.heartbeat_seconds:g} s, repeat {args.repeat}")
        # Death at every 5-s phase of a heartbeat period (the simulator's step).
        phases = [STEP * k for k in range(int(S.heartbeat_seconds / STEP))]
        dm = [
            dead_machine(args.pg, tmp, args.seed + i, phase)
            for i in range(args.repeat)
            for phase in phases
        ]
        print(
            "dead machine: suspected after "
            f"{statistics.mean(r['suspect_heartbeats'] for r in dm):.2f} heartbeats mean, "
            f"confirmed down after {statistics.mean(r['detect_heartbeats'] for r in dm):.2f} mean, "
            f"{max(r['detect_heartbeats'] for r in dm):.2f} worst "
            f"(target ≤ 2; {len(dm)} deaths over every phase of a period); requeued "
            f"{max(r['requeue_after_confirm_s'] for r in dm):.0f} s "
            f"after confirmation (target ≤ 60 s = 1 reconciler cycle); MTTR (running elsewhere) "
            f"{statistics.mean(r['mttr_s'] for r in dm):.0f} s mean"
        )
        fl = [flaky_machine(args.pg, tmp, args.seed + i) for i in range(args.repeat)]
        for r in fl:
            ratio = r["share_after"] / r["share_before"] if r["share_before"] else float("nan")
            print(
                "flaky machine (30 % failures, 1 of 10): tier ≥ 1 after "
                f"{r['to_tier1_heartbeats']:.1f} heartbeats (window {r['window_heartbeats']}); "
                f"share of work {r['share_before']:.1%} → {r['share_after']:.1%} "
                f"(×{ratio:.2f}, target ≤ 0.50); tiers {r['tiers_reached']}; "
                f"healthy machines quarantined {r['healthy_machines_quarantined']}"
            )
        sh = [slow_healthy(args.pg, tmp, args.seed + i) for i in range(args.repeat)]
        print(
            "slow-but-healthy mesh (8 machines, tasks 5× slower, heartbeats up to 25 s late, "
            "2 h): "
            f"false quarantines {sum(r['false_quarantines'] for r in sh)} (target 0), "
            f"false machine-downs {sum(r['false_downs'] for r in sh)}, "
            f"false requeues {sum(r['false_requeues'] for r in sh)}, "
            f"tasks done {sum(r['tasks_done'] for r in sh)}"
        )
        so = [store_outage(args.pg, tmp, args.seed + i) for i in range(args.repeat)]
        print(
            "store outage (chaos store-outage: mesh tables locked 60 s, 6 machines): noticed "
            f"by the watchdog after {max(r['detect_heartbeats'] for r in so):.1f} heartbeats; "
            f"mesh healthy again (heartbeats fresh, a task done) {_mean(so, 'after_revert_s')} "
            f"after the lock is released (MTTR {_mean(so, 'mttr_s')} from the outage); "
            f"false machine-downs {sum(r['false_downs'] for r in so)}, false requeues "
            f"{sum(r['false_requeues'] for r in so)}, false quarantines "
            f"{sum(r['false_quarantines'] for r in so)} (target 0)"
        )
        ge = [gateway_errors(tmp) for _ in range(args.repeat)]
        print(
            "gateway errors (chaos gateway-errors: dev AuraGateway 503 for 60 s, a spawn every "
            f"{STEP:g} s): breaker open after {max(r['detect_s'] for r in ge):.0f} s "
            f"(threshold {S.breaker_failure_threshold}); first spawn through again "
            f"{_mean(ge, 'after_revert_s')} after the revert (MTTR {_mean(ge, 'mttr_s')}; "
            f"breaker reset {S.breaker_reset_seconds:g} s)"
        )
        if not args.no_tmux and shutil.which("tmux"):
            dp = dead_pane(tmp)
            print(
                f"dead pane (real tmux, kill-pane): back in {dp['mttr_s_median']:.2f} s median, "
                f"{dp['mttr_s_max']:.2f} s max over {dp['rounds']} (target < 5 s)"
            )
            cs = cpu_spike(tmp, args.spike_seconds)
            print(
                f"cpu spike (chaos cpu-spike: {cs['cores']} busy process(es), "
                f"{args.spike_seconds:g} s, real agent): task round trip "
                f"{cs['baseline_s']:.2f} s → {cs['during_s'] or float('nan'):.2f} s during; "
                f"back within 1.5× {cs['after_revert_s']:.2f} s after the revert (MTTR "
                f"{cs['mttr_s']:.1f} s); quarantined {cs['quarantined']} (target 0)"
            )


if __name__ == "__main__":
    main()
