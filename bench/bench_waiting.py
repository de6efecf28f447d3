"""Orchestrator memory and threads with 10, 100 and 1 000 apps waiting on Hydra in hydraBuild.

    uv run python bench/bench_waiting.py                  # N = 10, 100, 1000; poll every 5 s
    uv run python bench/bench_waiting.py --sizes 10 100 --poll 2 --settle 20

Each N runs in a fresh process (the orchestrator): a cohort of N apps, every one already
past REVIEW, goes into EVOLVE on the embedded defaults (SQLite store, local executor,
Prefect's temporary local server) against a Hydra dev server (its own process) that never
passes them. Once all N are in hydraBuild and polling, the orchestrator's RSS and thread
count are sampled. Targets: RSS(1000) / RSS(10) ≤ 1.5; thread count independent of N.
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_hydra() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.devservers", "hydra", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "Hydra dev server on …": it listens
    return proc, f"http://127.0.0.1:{port}"


def prepare(directory: Path, n: int) -> Path:
    """A fleet of N apps (no local repo: EVOLVE spawns Hydra and polls), all adversarialComplete."""
    from fleet.clock import utcnow
    from fleet.models import FleetConfig, Stage
    from fleet.store.sqlite import SQLiteStore

    fleet = {
        "name": f"waiting-{n}",
        "commands": {"skill": ["true"], "review": ["true"], "evolve": ["true"], "ship": ["true"]},
        "apps": [{"id": f"app{i:04d}"} for i in range(n)],
    }
    path = directory / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    store = SQLiteStore(directory / "fleet.db")
    store.set_fleet_config(FleetConfig(max_concurrent=n))
    now = utcnow()
    ids = [a["id"] for a in fleet["apps"]]
    store.ensure_apps(ids, now)
    for app_id in ids:
        epoch = store.claim_app(app_id, "bench:1", "prepare", now, 60)
        for stage in (
            Stage.SKILL_RUNNING,
            Stage.SKILL_COMPLETE,
            Stage.ADVERSARIAL_RUNNING,
            Stage.ADVERSARIAL_COMPLETE,
        ):
            store.set_stage(app_id, stage, epoch, now)
        store.release_app(app_id, epoch)
    store.close()
    return path


async def orchestrate(n: int, path: Path, settle: float) -> dict[str, float]:
    import psutil

    from fleet.models import Stage
    from fleet.store.sqlite import SQLiteStore
    from flows.cohort import fleet_cohort

    me = psutil.Process()
    store = SQLiteStore(path.parent / "fleet.db")
    cohort = asyncio.create_task(fleet_cohort(fleet_file=str(path), size=n))
    started = time.monotonic()
    while (
        sum(s.stage is Stage.HYDRA_BUILD and s.owner is not None for s in store.list_states()) < n
    ):
        if cohort.done():
            raise SystemExit(f"the cohort ended before all apps waited: {cohort.result()}")
        await asyncio.sleep(1)
    all_waiting = time.monotonic() - started
    samples = []
    for _ in range(3):
        await asyncio.sleep(settle / 3)
        samples.append((me.memory_info().rss, me.num_threads()))
    return {
        "n": n,
        "rss_mb": max(r for r, _ in samples) / 2**20,
        "threads": max(t for _, t in samples),
        "seconds_to_all_waiting": all_waiting,
    }


def child(n: int, hydra_url: str, poll: float, settle: float) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-waiting-{n}-") as tmp:
        directory = Path(tmp)
        os.environ.update(
            {
                "FLEET_HOME": str(directory / "home"),
                "FLEET_STORE_URL": f"sqlite:///{directory / 'fleet.db'}",
                "FLEET_HYDRA_URL": hydra_url,
                "FLEET_HYDRA_POLL_SECONDS": str(poll),
            }
        )
        os.environ.pop("PREFECT_API_URL", None)
        path = prepare(directory, n)
        result = asyncio.run(orchestrate(n, path, settle))
        print(json.dumps(result), flush=True)
        # The apps would wait 4 h for Hydra: stop here. Prefect's temporary server is a child
        # of ours that atexit would stop; os._exit skips atexit, so stop it first.
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--poll", type=float, default=5.0, help="Hydra poll interval, seconds")
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds sampled once all apps wait"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hydra", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.hydra, args.poll, args.settle)
        return
    hydra, url = start_hydra()
    results = []
    try:
        for n in args.sizes:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(n),
                    "--hydra",
                    url,
                    "--poll",
                    str(args.poll),
                    "--settle",
                    str(args.settle),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                sys.exit(f"N={n} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
            result = json.loads(lines[-1])
            results.append(result)
            print(
                f"N={n:5d}  RSS {result['rss_mb']:7.1f} MB  threads {result['threads']:3d}  "
                f"(all waiting after {result['seconds_to_all_waiting']:.0f} s)",
                flush=True,
            )
    finally:
        hydra.terminate()
        hydra.wait()
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(
            f"RSS({last['n']}) / RSS({first['n']}) = {last['rss_mb'] / first['rss_mb']:.2f}  "
            "(target ≤ 1.5); "
            f"threads {[r['threads'] for r in results]} (target: independent of N)"
        )


if __name__ == "__main__":
    main()
