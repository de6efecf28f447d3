"""Cohort wall time against the agents' own time: `fleet run` vs bare asyncio plus fixed start-up.

    uv run python bench/bench_cohort.py                 # N = 12 and 24, stages sleep 3 s
    uv run python bench/bench_cohort.py --sleep 10 --with-89
    uv run python bench/bench_cohort.py --server-pg --sleep 10 --with-89
    uv run python bench/bench_cohort.py --api-calls     # Prefect API calls per app, N = 12 and 24
    uv run python bench/bench_cohort.py --workers 2     # a fanned-out cohort: apps per worker

Each of N apps has skill, review and ship commands that are subprocesses sleeping S seconds
(evolve and the quality check are `true`), `max_concurrent` = N, on the embedded defaults
(SQLite store, local executor and gate, Prefect's temporary local server). Printed:
fleet time / (bare-asyncio time of the same subprocesses + the fixed start-up of a
`fleet run` that has nothing to do). Target: ≤ 1.25 at N = 24. Figures are printed, never
asserted. With --server-pg the same runs talk to a `prefect server start` on PostgreSQL
(a fresh database, dropped at the end; the server settings of deployments/server_settings.py)
and the fleet's store is on PostgreSQL too (a fresh database per N). Target: ≤ 1.10 at
N = 89 with 10 s stages. With --api-calls the cohort runs in this process and every HTTP
request to the Prefect API and every event it emits is counted: the calls per app should
not grow with N. With --workers the cohort fans its apps out to an app-evolution
deployment on that many process workers of one pool (against the PostgreSQL server) and
prints how many apps each worker ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_waiting import free_port  # noqa: E402
from deployments.server_settings import SERVER_SETTINGS  # noqa: E402
from fleet.models import FleetConfig  # noqa: E402
from fleet.store import open_store  # noqa: E402

FLEET_CLI = Path(sys.executable).parent / "fleet"
PG_ADMIN_URL = os.environ.get("FLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

# skill answers with a marker block of three tasks, review with one issue, ship with nothing.
STAGE_AGENT = """import json, sys, time
mode, seconds = sys.argv[1], float(sys.argv[2])
time.sleep(seconds)
if mode == "skill":
    tasks = [{"priority": p, "description": f"Fix thing {p}.", "file": "a.py"} for p in (1, 2, 3)]
    print("<!-- EVOLUTION_TASKS_START -->" + json.dumps(tasks) + "<!-- EVOLUTION_TASKS_END -->")
elif mode == "review":
    print("ISSUE FILE: a.py SEVERITY: high FIX: Handle the empty input.")
"""


def write_fleet(directory: Path, n: int, sleep: float) -> Path:
    agent = directory / "stage_agent.py"
    agent.write_text(STAGE_AGENT)
    cmd = [sys.executable, str(agent)]
    fleet = {
        "name": f"bench-{n}",
        "commands": {
            "skill": [*cmd, "skill", str(sleep)],
            "review": [*cmd, "review", str(sleep)],
            "evolve": ["true"],
            "ship": [*cmd, "ship", str(sleep)],
        },
        "apps": [{"id": f"app{i:03d}", "check": ["true"]} for i in range(n)],
    }
    path = directory / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def bench_env(
    directory: Path, n: int, store_url: str | None = None, api_url: str | None = None
) -> dict[str, str]:
    """`fleet run`'s environment: the store (SQLite in `directory` unless given) with
    max_concurrent = N, and Prefect's temporary local server unless `api_url` is given."""
    store_url = store_url or f"sqlite:///{directory / 'fleet.db'}"
    store = open_store(store_url)
    store.set_fleet_config(FleetConfig(max_concurrent=n))
    store.close()
    env = {
        **os.environ,
        "FLEET_HOME": str(directory / "home"),
        "FLEET_STORE_URL": store_url,
        "FLEET_HYDRA_POLL_SECONDS": "1",
    }
    env.pop("PREFECT_API_URL", None)  # the embedded default: Prefect's temporary local server
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def timed_fleet_run(path: Path, n: int, env: dict[str, str]) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [str(FLEET_CLI), "run", "--fleet", str(path), "--size", str(n)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(
            f"fleet run failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return elapsed


async def bare(path: Path, n: int) -> float:
    """The same subprocesses, N apps at once, each app's stages one after the other."""
    commands = yaml.safe_load(path.read_text())["commands"]
    stages = [commands["skill"], commands["review"], commands["evolve"], ["true"], commands["ship"]]

    async def one() -> None:
        for argv in stages:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
            await proc.wait()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.monotonic() - started


def wall_ratio(n: int, sleep: float, api_url: str | None = None) -> None:
    """One N: the cohort, then a run with nothing to do, then bare asyncio. With `api_url`
    (a Prefect server) the store is a fresh PostgreSQL database, dropped afterwards."""
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{n}-")))
        store_url = None
        if api_url:
            store_url = stack.enter_context(
                scratch_database(f"fleet_bench_store_{os.getpid()}_{n}")
            )
        path = write_fleet(directory, n, sleep)
        env = bench_env(directory, n, store_url, api_url)
        fleet = timed_fleet_run(path, n, env)
        fixed = timed_fleet_run(path, n, env)  # every app complete: nothing to do
        bare_s = asyncio.run(bare(path, n))
    target = "≤ 1.10 at N=89, 10 s stages" if api_url else "≤ 1.25 at N=24"
    print(
        f"N={n:3d} sleep={sleep:g}s  fleet run {fleet:6.1f} s  bare asyncio {bare_s:5.1f} s  "
        f"fixed start-up {fixed:5.1f} s  ratio {fleet / (bare_s + fixed):.2f}  "
        f"(target {target})",
        flush=True,
    )


# A Prefect server on PostgreSQL ------------------------------------------------------------
@contextlib.contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped (connections and all) afterwards."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def prefect_server_on_postgres(directory: Path) -> Iterator[str]:
    """`prefect server start` on a fresh PostgreSQL database; yields its API URL.

    The server gets the settings the engine needs under load (deployments/server_settings.py)
    and its own PREFECT_HOME; its log is kept in `directory` (printed if it fails to start).
    """
    import httpx

    with scratch_database(f"fleet_bench_prefect_{os.getpid()}") as url:
        port = free_port()
        env = {
            **os.environ,
            **SERVER_SETTINGS,
            "PREFECT_HOME": str(directory / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": url.replace(
                "postgresql://", "postgresql+asyncpg://", 1
            ),
        }
        env.pop("PREFECT_API_URL", None)
        log = directory / "prefect-server.log"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
            ],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        api = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + 180  # a first start migrates the new database
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"prefect server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
            yield api
        finally:
            stop_group(server)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def server_ratios(sizes: list[int], sleep: float) -> None:
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-server-"))
        api = stack.enter_context(prefect_server_on_postgres(Path(tmp)))
        print(f"prefect server on PostgreSQL at {api}", flush=True)
        for n in sizes:
            wall_ratio(n, sleep, api)


# A fanned-out cohort on process workers ------------------------------------------------------
def fan_out_split(workers: int, n: int, sleep: float) -> None:
    """A cohort of N apps submitted to an app-evolution deployment on one pool that
    `workers` process workers poll (each runs one app at a time); prints how many apps each
    worker ran and whether every app ran exactly once."""
    from tests.test_fanout import ran_by, start_worker

    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fan-")))
        api = stack.enter_context(prefect_server_on_postgres(directory))
        store_url = stack.enter_context(scratch_database(f"fleet_bench_store_{os.getpid()}_fan"))
        suffix = f"bench-fanout-{os.getpid()}"
        env = {
            **bench_env(directory, n, store_url, api),
            "FLEET_APP_DEPLOYMENT": f"app-evolution/{suffix}",
            "FLEET_COHORT_POLL_SECONDS": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        # Before Prefect is imported: this process runs the cohort (quietly; the workers log
        # at INFO, which is where they say which runs they took).
        os.environ.update(env, PREFECT_LOGGING_LEVEL="WARNING")
        path = write_fleet(directory, n, sleep)
        deployment_id = asyncio.run(deploy_app_flow(suffix))
        logs = [directory / f"worker-{i}.log" for i in range(workers)]
        procs = [start_worker(suffix, log.stem, env, log) for log in logs]
        for proc in procs:
            stack.callback(stop_group, proc)
        started = time.monotonic()
        asyncio.run(fan_out_cohort(path, n))
        elapsed = time.monotonic() - started
        runs = asyncio.run(app_runs(deployment_id))
        ran = {log.stem: ran_by(log) for log in logs}
    apps = sorted(r.parameters["app_id"] for r in runs)
    once = apps == sorted(set(apps)) and len(apps) == n
    picked = [run for runs_of in ran.values() for run in runs_of]
    print(
        f"fan-out N={n} on {workers} workers ({elapsed:.0f} s): "
        + ", ".join(f"{name} ran {len(ids)}" for name, ids in ran.items())
        + f"; {len(runs)} app runs, each app exactly once: {'yes' if once else 'NO'}"
        + f", no run picked up twice: {'yes' if len(picked) == len(set(picked)) else 'NO'}",
        flush=True,
    )


async def deploy_app_flow(name: str):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.app_evolution import evolve_app

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    deployment = await evolve_app.to_deployment(
        name=name, work_pool_name=name, job_variables={"working_dir": str(ROOT)}
    )
    return await deployment.apply()


async def fan_out_cohort(path: Path, n: int) -> None:
    from flows.cohort import fleet_cohort

    await fleet_cohort(fleet_file=str(path), size=n, fan_out=True)


async def app_runs(deployment_id):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


# Prefect API calls per app ---------------------------------------------------------------
class Counter:
    """Counts HTTP requests to the Prefect API and events emitted, from this process."""

    def __init__(self) -> None:
        self.requests = 0
        self.events = 0

    def install(self) -> None:
        import httpx
        from prefect.events.clients import PrefectEventsClient

        send, emit = httpx.AsyncClient.send, PrefectEventsClient.emit
        counter = self

        async def counted_send(client, request, *args, **kwargs):
            if "/api/" in str(request.url):
                counter.requests += 1
            return await send(client, request, *args, **kwargs)

        async def counted_emit(client, event):
            counter.events += 1
            return await emit(client, event)

        httpx.AsyncClient.send = counted_send  # type: ignore[method-assign]
        PrefectEventsClient.emit = counted_emit  # type: ignore[method-assign]


def api_calls(sizes: list[int]) -> None:
    counter = Counter()
    counter.install()
    from fleet.settings import get_settings
    from fleet.wiring import reset_components
    from flows.cohort import fleet_cohort

    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-calls-{n}-") as tmp:
            directory = Path(tmp)
            path = write_fleet(directory, n, 0)
            for key, value in bench_env(directory, n).items():
                os.environ[key] = value
            get_settings.cache_clear()
            reset_components()
            asyncio.run(fleet_cohort(fleet_file=str(path), size=n))  # warms the server up
            before = (counter.requests, counter.events)
            asyncio.run(fleet_cohort(fleet_file=str(path), size=n, fresh=True))
            requests, events = counter.requests - before[0], counter.events - before[1]
            before = (counter.requests, counter.events)
            asyncio.run(fleet_cohort(fleet_file=str(path), size=n))  # nothing to do: the fixed part
            fixed_requests, fixed_events = counter.requests - before[0], counter.events - before[1]
            reset_components()
        print(
            f"N={n:3d}  per app run: {(requests - fixed_requests) / n:5.1f} HTTP requests, "
            f"{(events - fixed_events) / n:5.1f} events  (cohort total {requests} requests, "
            f"{events} events; a cohort with nothing to do: {fixed_requests}, {fixed_events})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--with-89", action="store_true", help="also N = 89")
    parser.add_argument("--sleep", type=float, default=3.0, help="seconds each agent stage sleeps")
    parser.add_argument(
        "--api-calls", action="store_true", help="count Prefect API calls per app instead"
    )
    parser.add_argument(
        "--server-pg",
        action="store_true",
        help="against `prefect server start` on PostgreSQL, the store on PostgreSQL too",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="fan a cohort out to this many process workers"
    )
    parser.add_argument(
        "--fan-out-apps", type=int, default=4, help="apps in the fanned-out cohort (--workers)"
    )
    args = parser.parse_args()
    sizes = [*args.sizes, *([89] if args.with_89 else [])]
    if args.api_calls:
        api_calls(sizes)
        return
    if args.workers:
        fan_out_split(args.workers, args.fan_out_apps, args.sleep)
        return
    if args.server_pg:
        server_ratios(sizes, args.sleep)
        return
    for n in sizes:
        wall_ratio(n, args.sleep)


if __name__ == "__main__":
    main()
