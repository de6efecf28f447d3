"""Mesh queue benchmark on a real PostgreSQL: claim throughput and reconciler cycle cost.

    uv run python bench/bench_mesh.py --pg postgresql://postgres@127.0.0.1:5432/postgres

Creates its own database, applies supabase/migrations, prints figures, drops the database.
The figures are printed, not asserted. The reconciler's cost should follow the stale rows,
not the table: with the same 1 000 stale claims, 10 000 and 100 000 total rows should give
a ratio near 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from fleet.mesh.pg_store import PgMeshStore
from fleet.settings import FleetSettings
from fleet.store.migrations import apply_migrations

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = FleetSettings()
MESH_TABLES = "mesh_task_events, mesh_task_queue, mesh_health, mesh_pane_state"


def _db_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def bench_claims(
    url: str, claimers: int, tasks: int, limit: int, budget_s: float
) -> tuple[int, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {MESH_TABLES} RESTART IDENTITY")
        conn.execute(
            "INSERT INTO mesh_task_queue (task_id, kind, command, status, created_at) "
            "SELECT 'c' || g, 'skill', '[\"x\"]'::jsonb, 'queued',"
            " %s + g * interval '1 microsecond' "
            "FROM generate_series(1, %s) g",
            (NOW, tasks),
        )
        conn.execute("ANALYZE mesh_task_queue")
    counts = [0] * claimers
    start = threading.Barrier(claimers + 1)
    deadline = [0.0]

    def run(i: int) -> None:
        store = PgMeshStore(url)
        store.machines()  # connect before the clock starts
        start.wait()
        while time.perf_counter() < deadline[0]:
            got = store.claim(f"bench-{i}", NOW, limit=limit)
            if not got:
                break
            counts[i] += len(got)
        store.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + budget_s
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    with psycopg.connect(url) as conn:
        distinct = conn.execute(
            "SELECT count(*) FROM mesh_task_queue WHERE status = 'claimed'"
        ).fetchone()[0]
    assert distinct == sum(counts), "a task was claimed twice"
    return sum(counts), elapsed


def load_world(url: str, total: int, stale: int) -> None:
    """`total` rows: `stale` orphaned claims, 2 % fresh active work, 3 % queued, the rest done."""
    fresh_active = total * 2 // 100
    queued = total * 3 // 100
    done = total - stale - fresh_active - queued
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {MESH_TABLES} RESTART IDENTITY")
        conn.execute(
            "INSERT INTO mesh_health"
            " (machine_id, mesh_id, role, generation, last_heartbeat, updated_at) "
            "SELECT 'live-' || g, 'bench', 'worker', 1, %s, %s FROM generate_series(1, 8) g",
            (NOW, NOW),
        )
        rows = [
            # (count, status, claimed_by, claimed_at offset, progress offset)
            (done, "done", "NULL", "NULL", "NULL"),
            (queued, "queued", "NULL", "NULL", "NULL"),
            (
                fresh_active,
                "running",
                "'live-' || (1 + g %% 8)",
                "%(now)s - interval '1 minute'",
                "%(now)s - interval '30 seconds'",
            ),
            (stale, "claimed", "'dead-' || (g %% 3)", "%(now)s - interval '20 minutes'", "NULL"),
        ]
        offset = 0
        for count, status, claimer, claimed_at, progress_at in rows:
            conn.execute(
                "INSERT INTO mesh_task_queue"
                " (task_id, kind, command, status, claimed_by, created_at, "
                "claimed_at, progress_at, finished_at) "
                f"SELECT 't' || (g + %(off)s), 'skill', '[\"x\"]'::jsonb, %(status)s, {claimer}, "
                "%(now)s - interval '1 hour' + g * interval '1 millisecond', "
                f"{claimed_at}, {progress_at}, "
                "CASE WHEN %(status)s = 'done' THEN %(now)s - interval '5 minutes' END "
                "FROM generate_series(1, %(n)s) g",
                {"off": offset, "status": status, "now": NOW, "n": count},
            )
            offset += count
        conn.execute("VACUUM ANALYZE mesh_task_queue")


def restale(url: str) -> None:
    """Put the requeued rows back as stale claims (setup between timed cycles, not timed)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE mesh_task_queue SET status = 'claimed', claimed_by = 'dead-0', attempts = 0, "
            "claimed_at = %s - interval '20 minutes', progress_at = NULL "
            "WHERE status = 'queued' AND attempts > 0",
            (NOW,),
        )


def bench_reconcile(url: str, total: int, stale: int, runs: int) -> tuple[float, float, int]:
    load_world(url, total, stale)
    store = PgMeshStore(url)
    kwargs = dict(
        orphan_seconds=S.orphan_claim_seconds,
        stuck_seconds=S.stuck_injection_seconds,
        expiry_seconds=S.task_expiry_seconds,
        max_attempts=100,
    )
    busy, idle, moved = [], [], 0
    for _ in range(runs):
        restale(url)
        t0 = time.perf_counter()
        counts = store.reconcile(NOW, **kwargs)
        busy.append(time.perf_counter() - t0)
        moved = counts.orphaned_requeued
        t0 = time.perf_counter()
        store.reconcile(NOW, **kwargs)  # nothing stale left: the floor of a cycle
        idle.append(time.perf_counter() - t0)
    store.close()
    return statistics.median(busy), statistics.median(idle), moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="an admin connection string; a scratch database is created beside it",
    )
    parser.add_argument("--claimers", type=int, default=4)
    parser.add_argument("--claim-tasks", type=int, default=20_000)
    parser.add_argument("--claim-seconds", type=float, default=8.0)
    parser.add_argument("--stale", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _db_url(args.pg, name)
    started = time.perf_counter()
    try:
        apply_migrations(url)
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        print(f"PostgreSQL {version}, scratch database {name}")

        for limit in (1, 10):
            n, secs = bench_claims(url, args.claimers, args.claim_tasks, limit, args.claim_seconds)
            print(
                f"claims: {args.claimers} concurrent claimers, limit={limit}: {n} tasks in "
                f"{secs:.2f} s = {n / secs:,.0f} claims/s (each claimed exactly once)"
            )

        results = {}
        for total in (10_000, 100_000):
            busy, idle, moved = bench_reconcile(url, total, args.stale, args.runs)
            results[total] = busy
            print(
                f"reconcile: {total:>7,} rows, {args.stale:,} stale claims:"
                f" cycle {busy * 1000:.1f} ms "
                f"(median of {args.runs}, {moved} requeued); idle cycle {idle * 1000:.1f} ms"
            )
        print(
            f"reconcile cost ratio 100k/10k rows with the same stale set: "
            f"{results[100_000] / results[10_000]:.2f} (near 1 = tracks stale rows, not total rows)"
        )
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"total bench time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
