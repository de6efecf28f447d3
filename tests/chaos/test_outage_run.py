"""A real `fleet run` on the real PostgreSQL through the chaos proxy, its store cut mid-run:
a 30 s cut inside the outage budget is waited out and the run completes; a cut past the budget
ends the run as a clean failure (one line, no traceback, exit 1), and a rerun completes it.
Both leave what every chaos scenario leaves (`assert_recovered`)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleet.devservers.aura import AuraDevServer
from fleet.devservers.hydra import HydraDevServer
from fleet.models import Stage
from fleet.store.postgres import PostgresStore
from tests.chaos.proxy import TcpProxy
from tests.chaos.test_kill import APPS, PrefectApi, Rig, assert_recovered, finish, kill_group

pytestmark = [pytest.mark.postgres, pytest.mark.prefect]
PG_ADMIN_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CUT_SECONDS = 30.0


class PgRig(Rig):
    """The rig on PostgreSQL through the proxy; the test reads the store directly."""

    store_url: str = ""
    direct_url: str = ""

    @property
    def store(self) -> PostgresStore:  # type: ignore[override]
        return PostgresStore(self.direct_url, apply_schema=False)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return super().env(name, **{"FLEET_STORE_URL": self.store_url, **extra})

    def duplicate_tasks(self) -> int:
        import psycopg

        with psycopg.connect(self.direct_url) as db:
            row = db.execute(
                "SELECT COUNT(*) - COUNT(DISTINCT (app_id, source, description, "
                "COALESCE(file, ''))) FROM app_evolution_tasks"
            ).fetchone()
        return int(row[0]) if row else 0


@contextmanager
def pg_rig_on(
    root: Path,
    aura: AuraDevServer,
    hydra: HydraDevServer,
    admin: str = PG_ADMIN_URL,
    prefect: PrefectApi | None = None,
) -> Iterator[tuple[PgRig, TcpProxy]]:
    """A fresh database of its own (other scenarios and helpers share the server), the rig on
    it through a proxy to cut; the database is dropped afterwards. The bench uses it too."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"fleet_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    direct = make_conninfo(admin, dbname=name)
    params = conninfo_to_dict(direct)
    upstream = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    try:
        with TcpProxy(upstream) as proxy:
            rig = PgRig(root, aura, hydra, held="review", prefect=prefect)
            user = params.get("user") or "postgres"
            rig.store_url = f"postgresql://{user}@127.0.0.1:{proxy.port}/{name}"
            rig.direct_url = direct
            PostgresStore(direct).close()  # the schema, before the run
            yield rig, proxy
    finally:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_rig(
    tmp_path: Path, aura: AuraDevServer, hydra: HydraDevServer, prefect_api: PrefectApi
) -> Iterator[tuple[PgRig, TcpProxy]]:
    with pg_rig_on(tmp_path, aura, hydra, prefect=prefect_api) as rig_and_proxy:
        yield rig_and_proxy


def outage_lines(output: str) -> list[str]:
    return [
        line for line in output.splitlines() if "store unreachable" in line or "store back" in line
    ]


def test_a_30_s_store_cut_mid_run_is_waited_out_and_the_run_completes(
    pg_rig: tuple[PgRig, TcpProxy],
) -> None:
    rig, proxy = pg_rig
    run = rig.start("first")
    try:
        rig.wait_until(lambda: rig.in_stage(Stage.ADVERSARIAL_RUNNING), run)
        proxy.cut()
        rig.release()  # the review ends during the cut: what it found waits for the store
        time.sleep(CUT_SECONDS)
        assert run.poll() is None, rig.output("first")  # still waiting, not crashed
        proxy.restore()
        restored = time.monotonic()
        code = finish(run)
    finally:
        kill_group(run)
    output = rig.output("first")
    assert code == 0, output
    assert proxy.refused > 0
    lines = outage_lines(output)
    assert any("store back" in line for line in lines), output
    assert len(lines) <= 4 * (len(APPS) + 1), lines  # one down/back pair per waiter, not per try
    assert_recovered(rig, output)
    took = time.monotonic() - restored
    print(
        f"\nFIGURE store cut {CUT_SECONDS:.0f} s mid-run: complete {took:.1f} s after the "
        f"restore, {len(lines)} outage log lines, {proxy.refused} connections refused"
    )


def test_a_cut_past_the_budget_fails_the_run_cleanly_and_a_rerun_completes_it(
    pg_rig: tuple[PgRig, TcpProxy],
) -> None:
    rig, proxy = pg_rig
    first = rig.start("first", extra={"FLEET_STORE_OUTAGE_BUDGET_SECONDS": "3"})
    try:
        rig.wait_until(lambda: rig.in_stage(Stage.ADVERSARIAL_RUNNING), first)
        proxy.cut()
        rig.release()
        cut = time.monotonic()
        code = finish(first)  # it ends by itself, the store still cut
        gave_up = time.monotonic() - cut
    finally:
        kill_group(first)
        proxy.restore()
    failed = rig.output("first")
    assert code == 1, failed
    assert "past the outage budget of 3 s" in failed, failed
    assert "Traceback" not in failed
    assert all(s is not Stage.COMPLETE for s in rig.stages().values())  # nothing moved meanwhile
    second = rig.start("second")
    assert finish(second) == 0, rig.output("second")
    assert_recovered(rig, failed, rig.output("second"))
    print(f"\nFIGURE store cut past a 3 s budget: clean failure {gave_up:.1f} s into the cut")
