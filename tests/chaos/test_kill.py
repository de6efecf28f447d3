"""`kill -9` of a real `fleet run` (its whole process group) at a chosen moment, against the
Aura and Hydra dev servers, resumed by an immediate rerun on the same host and by a standby
on another host: every app ends complete, no task twice, each app shipped exactly once, no
protected path changed, no agent of the dead run left, no canary secret anywhere, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from fleet.devservers.aura import AuraDevServer
from fleet.devservers.hydra import HydraDevServer
from fleet.models import Stage
from fleet.store.sqlite import SQLiteStore
from tests.helpers import PY, demo_fleet

AGENT = str(Path(__file__).resolve().parents[2] / "examples" / "demo" / "agent.py")
CHECK = [PY, "-m", "unittest", "discover", "-s", "tests", "-t", "."]
TOKEN = "chaos-kill-token-51c2e8"
# Secrets the orchestrator holds and nothing it writes or starts may show.
CANARY = "canary-secret-7f3a91d0"
CANARIES = {"OPENAI_API_KEY": CANARY, "AWS_SECRET_ACCESS_KEY": CANARY, "FLEET_CANARY_TOKEN": CANARY}
APPS = ("demo-calc", "demo-weather")  # two apps: a cohort, and 2 cores stay enough
RUN_TIMEOUT = 150.0
# Every stage command goes through this: it writes the environment the agent gets (so the
# canary search covers agent environments) and marks that it started; the held stage then
# waits for a "go" file (the dev server's env is an allowlist, so the paths come in argv).
HOLD = """\
import json, os, sys, time
flags, name, gate, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5:]
with open(os.path.join(flags, f"env-{name}-{os.getpid()}.json"), "w") as f:
    json.dump(dict(os.environ), f)
open(os.path.join(flags, name + ".started"), "a").close()
deadline = time.monotonic() + 120
while gate == "hold" and not os.path.exists(os.path.join(flags, "go")):
    if time.monotonic() > deadline:
        break
    time.sleep(0.05)
os.execv(argv[0], argv)
"""
# Runs the CLI as if on another machine: the standby cannot see whether the dead run's pid
# lives, so it must wait out the lease, as a second worker on another host does.
OTHER_HOST = (
    "import runpy, socket, sys; socket.gethostname = lambda: 'standby-host'; "
    "sys.argv[0] = 'fleet'; runpy.run_module('fleet.cli', run_name='__main__')"
)


@dataclass(frozen=True)
class PrefectApi:
    """A Prefect API the runs share (the session's harness): no temporary server to start per
    run, which is most of a `fleet run`'s start-up. `files` holds its database."""

    url: str
    files: Path


@dataclass
class Rig:
    """One fleet on the shared dev servers, its SQLite store and the `fleet run`s on it."""

    root: Path
    aura: AuraDevServer
    hydra: HydraDevServer
    held: str  # the stage whose command waits at the gate ("hydra": Hydra fails until go)
    prefect: PrefectApi | None = None  # None: each run starts a temporary API of its own
    local: bool = False  # agents run by the orchestrator's local executor, checks locally
    fleet_file: Path = field(init=False)
    db: Path = field(init=False)
    flags: Path = field(init=False)
    repos: Path = field(init=False)

    def __post_init__(self) -> None:
        self.fleet_file = demo_fleet(self.root)
        self.repos = self.fleet_file.parent / "repos"
        self.db = self.root / "fleet.db"
        self.flags = self.root / "flags"
        self.flags.mkdir()
        hold = self.root / "hold.py"
        hold.write_text(HOLD)
        data = yaml.safe_load(self.fleet_file.read_text())
        for mode in ("skill", "review", "evolve", "ship"):
            argv = [PY, AGENT, mode, f"{self.repos}/{{app_id}}"]
            argv += ["{prompt}"] if mode != "ship" else []
            gate = "hold" if mode == self.held else "pass"
            data["commands"][mode] = [PY, str(hold), str(self.flags), f"{mode}-{{app_id}}", gate]
            data["commands"][mode] += ["--", *argv]
        data["apps"] = [a for a in data["apps"] if a["id"] in APPS]
        for app in data["apps"]:
            if self.local:
                continue
            del app["repo"], app["check"]  # remote apps: Hydra is the gate
            if self.held == "hydra":  # Hydra answers "not passing yet" until go
                self.hydra.set_status(app["id"])
            else:
                self.hydra.set_check(app["id"], CHECK, cwd=self.repos / app["id"])
        self.fleet_file.write_text(yaml.safe_dump(data, sort_keys=False))

    @property
    def store(self) -> SQLiteStore:
        return SQLiteStore(self.db)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "FLEET_HOME": str(self.root / f"home-{name}"),
            "PREFECT_HOME": str(self.root / f"prefect-{name}"),
            "FLEET_STORE_URL": f"sqlite:///{self.db}",
            "FLEET_AURA_URL": self.aura.url,
            "FLEET_AURA_TOKEN": TOKEN,
            "FLEET_HYDRA_URL": self.hydra.url,
            "FLEET_HYDRA_TOKEN": TOKEN,
            "FLEET_HYDRA_POLL_SECONDS": "0.5",
            "FLEET_GATEWAY_POLL_INITIAL_SECONDS": "0.2",
            "FLEET_GATEWAY_POLL_MAX_SECONDS": "0.5",
            "FLEET_APP_LEASE_SECONDS": "6",
            "FLEET_APP_HEARTBEAT_SECONDS": "2",
            "FLEET_PLANNER_LEASE_SECONDS": "3",
            "FLEET_PLANNER_RENEW_SECONDS": "1",
            "FLEET_PLANNER_RETRY_SECONDS": "0.5",
            "COLUMNS": "200",
            **CANARIES,
            **extra,
        }
        env.pop("PREFECT_API_URL", None)
        if self.local:
            for name in ("FLEET_AURA_URL", "FLEET_AURA_TOKEN", "FLEET_HYDRA_URL"):
                env.pop(name)
        if self.prefect is not None:
            env["PREFECT_API_URL"] = self.prefect.url
        return env

    def start(
        self, name: str, *, other_host: bool = False, extra: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """`fleet run` in a process group of its own (the kill takes its children too)."""
        cli = ["-c", OTHER_HOST] if other_host else ["-m", "fleet.cli"]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [
                sys.executable,
                *cli,
                "run",
                "--fleet",
                str(self.fleet_file),
                "--size",
                str(len(APPS)),
            ],
            cwd=self.root,
            env=self.env(name, **(extra or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def output(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_until(self, moment: Callable[[], bool], proc: subprocess.Popen[str]) -> float:
        started = time.monotonic()
        while not moment():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the moment:\n{self.output('first')}")
            if time.monotonic() - started > RUN_TIMEOUT:
                raise AssertionError(f"moment never came:\n{self.output('first')}")
            time.sleep(0.05)
        return time.monotonic() - started

    def stages(self) -> dict[str, Stage | None]:
        store = self.store
        try:
            return {a: (s.stage if (s := store.get_state(a)) else None) for a in APPS}
        finally:
            store.close()

    def in_stage(self, stage: Stage) -> bool:
        held = self.held != "hydra"
        return all(s is stage for s in self.stages().values()) and all(
            not held or (self.flags / f"{self.held}-{a}.started").exists() for a in APPS
        )

    def evolving(self) -> bool:
        """Every app's evolution was started on the gateway: the run is in the Hydra wait."""
        return all((self.flags / f"evolve-{a}.started").exists() for a in APPS)

    def ship_recorded(self) -> bool:
        store = self.store
        try:
            return all(any(e.kind == "ship" for e in store.list_effects(a)) for a in APPS)
        finally:
            store.close()

    def release(self) -> None:
        (self.flags / "go").touch()
        if self.held == "hydra":
            for a in APPS:
                self.hydra.set_check(a, CHECK, cwd=self.repos / a)

    def duplicate_tasks(self) -> int:
        with sqlite3.connect(self.db) as db:
            rows = db.execute(
                "SELECT COUNT(*) - COUNT(DISTINCT app_id || source || description || "
                "COALESCE(file, '')) FROM app_evolution_tasks"
            ).fetchone()
        return int(rows[0])

    def ship_effects(self) -> dict[str, int]:
        store = self.store
        try:
            return {a: sum(e.kind == "ship" for e in store.list_effects(a)) for a in APPS}
        finally:
            store.close()

    def ships_run(self) -> dict[str, int]:
        """How many ship commands the gateway ran per app of this rig."""
        return {
            a: sum(
                "ship" in t.argv and f"{self.repos}/{a}" in t.argv and t.status != "queued"
                for t in self.aura.tasks()
            )
            for a in APPS
        }

    def protected_changes(self) -> dict[str, str]:
        """Per app, what differs under the protected `ci/` from the repo as the fleet found it
        (committed since, or left in the work tree)."""
        changed = {}
        for a in APPS:
            repo = self.repos / a
            root = git(repo, "rev-list", "--max-parents=0", "HEAD").split()[0]
            diff = git(repo, "diff", "--name-only", root, "--", "ci")
            diff += git(repo, "status", "--porcelain", "--", "ci")
            if diff.strip():
                changed[a] = diff.strip()
        return changed

    def agents_left(self) -> list[str]:
        """Live processes that run a stage command of this rig (the gateway's or a dead run's)."""
        mine = str(self.root)
        left = []
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(mine in c for c in cmd):
                left.append(" ".join(cmd)[:200])
        return left

    def canaries_found(self) -> list[str]:
        """Files under the rig (logs, stores, PREFECT_HOMEs, agents' environments, the
        gateway's work and outputs) and of the Prefect API (flow runs, logs, artifacts) that
        hold the canary or the gateway token."""
        tops = [self.root] + ([self.prefect.files] if self.prefect else [])
        return [
            str(path)
            for top in tops
            for path in top.rglob("*")
            if path.is_file()
            and not path.is_symlink()
            and (CANARY.encode() in (data := path.read_bytes()) or TOKEN.encode() in data)
        ]

    def agent_envs(self) -> list[dict[str, str]]:
        return [json.loads(p.read_text()) for p in self.flags.glob("env-*.json")]

    def lease_over(self) -> None:
        """Wait until no app's claim is live any more (as seen from another host)."""
        from datetime import UTC, datetime

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            store = self.store
            try:
                leases = [s.lease_until for a in APPS if (s := store.get_state(a))]
            finally:
                store.close()
            if all(u is None or u < datetime.now(UTC) for u in leases):
                return
            time.sleep(0.1)
        raise AssertionError("the dead run's leases never ran out")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def assert_recovered(rig: Rig, *outputs: str) -> None:
    """What every chaos scenario must leave behind, whatever went wrong on the way."""
    joined = "\n".join(outputs)
    assert rig.stages() == dict.fromkeys(APPS, Stage.COMPLETE), joined
    assert rig.duplicate_tasks() == 0
    assert rig.ship_effects() == dict.fromkeys(APPS, 1)
    if not rig.local:  # the gateway ran each ship command once
        assert rig.ships_run() == dict.fromkeys(APPS, 1)
    assert rig.protected_changes() == {}
    deadline = time.monotonic() + 10  # a killed agent may take a moment to be reaped
    while rig.agents_left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rig.agents_left() == []
    assert rig.agent_envs(), "the stage commands recorded their environments"
    assert rig.canaries_found() == []
    assert "Traceback" not in joined


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def finish(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise


MOMENTS: dict[str, tuple[str, Callable[[Rig], bool]]] = {
    "skill": ("skill", lambda rig: rig.in_stage(Stage.SKILL_RUNNING)),
    "review": ("review", lambda rig: rig.in_stage(Stage.ADVERSARIAL_RUNNING)),
    "hydra-wait": ("hydra", lambda rig: rig.in_stage(Stage.HYDRA_BUILD) and rig.evolving()),
    "after-ship-effect": ("ship", Rig.ship_recorded),
}
# (moment, resumed by a standby): each moment once, the ones nearest a side effect both ways
# (CI time: every scenario starts two `fleet run`s).
SCENARIOS = [
    ("skill", False),
    ("review", False),
    ("review", True),
    ("after-ship-effect", False),
    ("after-ship-effect", True),
]


def resume_after_kill(rig: Rig, moment: str, standby: bool) -> tuple[float, float, str, str]:
    """Kill the first run at `moment`, resume it; returns (kill at, resumed in, both outputs)."""
    first = rig.start("first")
    try:
        killed_at = rig.wait_until(lambda: MOMENTS[moment][1](rig), first)
    finally:
        kill_group(first)
    killed = time.monotonic()
    if standby:
        rig.lease_over()  # a standby elsewhere sees the claims live until their lease ends
    second = rig.start("second", other_host=standby)
    rig.release()
    code = finish(second)
    output = rig.output("second")
    assert code == 0, output
    return killed_at, time.monotonic() - killed, rig.output("first"), output


@pytest.mark.parametrize(
    ("moment", "standby"),
    SCENARIOS,
    ids=[f"{m}-{'standby' if s else 'rerun'}" for m, s in SCENARIOS],
)
def test_kill_9_of_the_orchestrator_loses_and_repeats_nothing(
    aura: AuraDevServer,
    hydra: HydraDevServer,
    prefect_api: PrefectApi,
    tmp_path: Path,
    moment: str,
    standby: bool,
) -> None:
    rig = Rig(tmp_path, aura, hydra, held=MOMENTS[moment][0], prefect=prefect_api)
    killed_at, took, first, second = resume_after_kill(rig, moment, standby)
    assert_recovered(rig, first, second)
    print(f"\nFIGURE kill at {moment} ({killed_at:.1f} s in), {took:.1f} s to complete")


STORM = {"FLEET_BREAKER_FAILURE_THRESHOLD": "2", "FLEET_BREAKER_RESET_SECONDS": "1"}


def test_a_hydra_503_storm_trips_the_breaker_then_kill_9_in_the_wait_is_taken_over(
    aura: AuraDevServer, hydra: HydraDevServer, prefect_api: PrefectApi, tmp_path: Path
) -> None:
    """Hydra answers 503 to a burst of polls: the breaker opens, half-opens and closes (each
    transition logged) while the apps wait; then the run is killed in that wait and a standby
    on another host takes over."""
    rig = Rig(tmp_path, aura, hydra, held="hydra", prefect=prefect_api)
    # The half-open and closed transitions are logged at INFO (the opening at WARNING): show
    # INFO for the `fleet` loggers, which take the root logger's level, on the console (the
    # CLI keeps its console handler at WARNING unless told otherwise).
    info = {"PREFECT_LOGGING_ROOT_LEVEL": "INFO", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"}
    first = rig.start("first", extra={**info, **STORM})
    transitions = ("-> open", "open -> half_open", "half_open -> closed")
    try:
        rig.wait_until(lambda: MOMENTS["hydra-wait"][1](rig), first)
        hydra.set_faults(fail_next=8)
        rig.wait_until(lambda: all(t in rig.output("first") for t in transitions), first)
    finally:
        kill_group(first)
        hydra.set_faults(fail_next=0)
    killed = time.monotonic()
    breaker = [line for line in rig.output("first").splitlines() if "circuit breaker" in line]
    rig.lease_over()
    second = rig.start("second", other_host=True, extra=STORM)
    rig.release()
    assert finish(second) == 0, rig.output("second")
    assert_recovered(rig, rig.output("first"), rig.output("second"))
    print(
        f"\nFIGURE hydra storm: {len(breaker)} breaker transitions logged; kill in the wait, "
        f"standby complete {time.monotonic() - killed:.1f} s after"
    )


def test_kill_9_takes_the_local_agents_down_with_it_and_a_rerun_completes(
    aura: AuraDevServer, hydra: HydraDevServer, prefect_api: PrefectApi, tmp_path: Path
) -> None:
    """Agents the orchestrator started itself (the local executor) die with it at once — no
    next run needed, so a standby on another host finds none left — and get none of its
    secrets; the rerun then completes the apps."""
    rig = Rig(tmp_path, aura, hydra, held="skill", prefect=prefect_api, local=True)
    first = rig.start("first")
    try:
        rig.wait_until(lambda: MOMENTS["skill"][1](rig), first)
        assert rig.agents_left(), "the held skill agents run"
    finally:
        kill_group(first)  # its process group: the agents lead sessions of their own
    killed = time.monotonic()
    while rig.agents_left() and time.monotonic() - killed < 10:
        time.sleep(0.05)
    gone_in = time.monotonic() - killed
    assert rig.agents_left() == []
    assert not any(CANARY in json.dumps(env) for env in rig.agent_envs())
    rig.release()
    second = rig.start("second")
    assert finish(second) == 0, rig.output("second")
    assert_recovered(rig, rig.output("first"), rig.output("second"))
    print(f"\nFIGURE kill -9 with local agents at skill: agents gone {gone_in:.2f} s after")
