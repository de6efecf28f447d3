"""A real PostgreSQL store cut off through a TCP proxy: a short cut inside the outage budget is
waited out (right data, one warning line), a cut past the budget ends in a clean StoreOutage,
and after the cut the same store object works again without being reopened."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import pytest

from fleet.clock import SystemClock
from fleet.errors import StoreUnavailable
from fleet.store.outage import StoreOutage, outage_tolerant, outage_tolerant_sync
from fleet.store.postgres import PostgresStore
from tests.chaos.proxy import TcpProxy
from tests.store_contract import T0


@pytest.fixture
def proxy(pg_url):
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(pg_url)
    with TcpProxy((str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))) as p:
        yield p


@pytest.fixture
def store(pg_url, proxy):
    from psycopg.conninfo import make_conninfo

    s = PostgresStore(make_conninfo(pg_url, host="127.0.0.1", port=str(proxy.port)))
    s.ensure_apps(["app-a"], T0)
    yield s
    s.close()


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fleet.store.outage"]


def test_the_proxy_really_cuts(store, proxy):
    assert store.get_state("app-a").app_id == "app-a"
    proxy.cut()
    with pytest.raises(StoreUnavailable):
        store.get_state("app-a")
    assert proxy.refused >= 1
    proxy.restore()
    assert store.get_state("app-a").app_id == "app-a"  # the same store object reconnects


def test_a_two_second_cut_inside_the_budget_is_waited_out(store, proxy, caplog, capsys):
    caplog.set_level(logging.INFO)
    epoch = store.claim_app("app-a", "host:1", "run-1", T0, 60)
    proxy.cut()
    restorer = threading.Timer(2.0, proxy.restore)
    restorer.start()
    started = time.monotonic()
    state = asyncio.run(
        outage_tolerant(
            lambda: store.get_state("app-a"),
            budget=30,
            clock=SystemClock(),
            log_key="app-a",
            initial=0.1,
            cap=0.5,
        )
    )
    waited = time.monotonic() - started
    restorer.join()
    assert (state.app_id, state.epoch, state.owner) == ("app-a", epoch, "host:1")
    assert 2.0 <= waited < 5, waited
    lines = outage_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("store unreachable (app-a), waiting up to 30 s")
    assert lines[1].startswith("store back (app-a) after 2.")
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in capsys.readouterr().err
    # The connector reconnected by itself: the next calls work on the same store object.
    assert store.renew_claim("app-a", epoch, T0, 60) is True
    assert store.get_state("app-a").epoch == epoch
    print(
        f"\nFIGURE store cut 2.0 s: call returned after {waited:.2f} s, "
        f"{proxy.refused} connection attempts refused meanwhile"
    )


def test_a_cut_longer_than_the_budget_ends_in_a_clean_store_outage(store, proxy, caplog, capsys):
    caplog.set_level(logging.INFO)
    store.get_state("app-a")
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(StoreOutage) as err:
        outage_tolerant_sync(
            lambda: store.get_state("app-a"),
            budget=1.0,
            clock=SystemClock(),
            log_key="app-a",
            initial=0.1,
            cap=0.5,
        )
    gave_up_after = time.monotonic() - started
    message = str(err.value)
    assert "\n" not in message and "past the outage budget of 1 s (app-a)" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert 1.0 <= gave_up_after < 3, gave_up_after
    assert len(outage_lines(caplog)) == 1
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in capsys.readouterr().err
    proxy.restore()
    assert store.get_state("app-a").app_id == "app-a"  # resumable: nothing to reopen
    print(f"\nFIGURE store cut past a 1 s budget: StoreOutage after {gave_up_after:.2f} s")


def test_the_heartbeat_keeps_the_claim_through_a_cut_inside_the_budget(store, proxy, caplog):
    from datetime import timedelta

    from fleet.store.heartbeat import ClaimHeartbeat

    caplog.set_level(logging.INFO)
    clock = SystemClock()
    lease = 5.0
    epoch = store.claim_app("app-a", "host:1", "run-1", clock.now(), lease)

    async def run() -> ClaimHeartbeat:
        beat = ClaimHeartbeat(
            store,
            "app-a",
            epoch,
            clock=clock,
            lease_seconds=lease,
            every_seconds=0.5,
            outage_budget=4,
        )
        async with beat:
            await asyncio.sleep(1)
            proxy.cut()
            await asyncio.sleep(1.5)
            proxy.restore()
            await asyncio.sleep(1.5)
        return beat

    beat = asyncio.run(run())
    assert not beat.lost.is_set() and beat.beats >= 3
    state = store.get_state("app-a")
    assert (state.epoch, state.owner) == (epoch, "host:1")
    assert state.lease_until > clock.now() + timedelta(seconds=lease - 1.5)
    lines = outage_lines(caplog)
    assert [line.split(" (")[0] for line in lines] == ["store unreachable", "store back"], lines


def test_a_refused_query_is_not_an_outage_and_is_not_waited_on(store):
    from fleet.store.outage import StoreUnreachable

    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        outage_tolerant_sync(
            lambda: store._db.fetch("SELECT * FROM no_such_table"),
            budget=30,
            clock=SystemClock(),
            log_key="app-a",
        )
    assert not isinstance(err.value, StoreUnreachable)
    assert time.monotonic() - started < 1


def test_the_live_table_shows_a_store_cut_and_comes_back(store, proxy):
    from rich.console import Console

    from fleet.cli import _LiveTable

    def text(table) -> str:
        console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(table)
        return console.export_text()

    view = _LiveTable(store, ["app-a"], time.monotonic())
    assert "app-a" in text(view.frame()) and "store unavailable" not in text(view.frame())
    proxy.cut()
    frames = [text(view.frame()) for _ in range(3)]  # never raises, however long the cut
    assert all("store unavailable" in f and "app-a" in f for f in frames), frames[-1]
    proxy.restore()
    assert "store unavailable" not in text(view.frame())


def test_the_cohort_plan_waits_out_a_cut_inside_the_budget(pg_url, proxy, tmp_path):
    """DISCOVER (the ranking, the max_concurrent read, the states) through `flows.cohort.stored`
    pauses while the store is cut and plans once it is back, under one `cohort` line."""
    from psycopg.conninfo import conninfo_to_dict

    from fleet.settings import FleetSettings
    from fleet.wiring import components
    from flows.cohort import discover, stored
    from tests.helpers import demo_fleet

    # Prefect (imported with the cohort flow) hands the `fleet` loggers its own handlers.
    heard: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("fleet.store.outage").addHandler(listener)
    params = conninfo_to_dict(pg_url)
    user = params.get("user") or "postgres"
    url = f"postgresql://{user}@127.0.0.1:{proxy.port}/{params['dbname']}"
    settings = FleetSettings(home=tmp_path / "home", store_url=url, store_outage_budget_seconds=30)
    comp = components(settings, demo_fleet(tmp_path))
    proxy.cut()
    restorer = threading.Timer(2.0, proxy.restore)
    restorer.start()
    started = time.monotonic()
    plan = asyncio.run(stored(comp, discover, comp, 3, False, False))
    waited = time.monotonic() - started
    restorer.join()
    assert sorted(plan.cohort) == sorted(comp.fleet.app_ids) and plan.start
    assert 2.0 <= waited < 15, waited
    logging.getLogger("fleet.store.outage").removeHandler(listener)
    assert [line.split(" after")[0].split(", waiting")[0] for line in heard] == [
        "store unreachable (cohort)",
        "store back (cohort)",
    ], heard
    comp.store.close()


def test_an_apps_claim_waits_out_a_cut_inside_the_budget(pg_url, proxy, tmp_path):
    """The claim step of an app run (`take`) pauses while the store is cut and claims the app
    once it is back, instead of ending the app with an error."""
    from psycopg.conninfo import conninfo_to_dict

    from fleet.claim import AppRun, take_waiting_out_outages
    from fleet.settings import FleetSettings
    from fleet.wiring import components
    from tests.helpers import demo_fleet

    params = conninfo_to_dict(pg_url)
    user = params.get("user") or "postgres"
    url = f"postgresql://{user}@127.0.0.1:{proxy.port}/{params['dbname']}"
    settings = FleetSettings(home=tmp_path / "home", store_url=url, store_outage_budget_seconds=30)
    comp = components(settings, demo_fleet(tmp_path))
    app_id = comp.fleet.app_ids[0]
    if comp.store.get_state(app_id) is not None:  # the shared database: free it of earlier tests
        comp.store.reset_app(app_id, comp.clock.now())
    proxy.cut()
    restorer = threading.Timer(2.0, proxy.restore)
    restorer.start()
    started = time.monotonic()
    try:
        run = asyncio.run(take_waiting_out_outages(comp, app_id, "run-claim-cut"))
    finally:
        restorer.join()
    assert 2.0 <= time.monotonic() - started < 15
    assert isinstance(run, AppRun), run
    state = comp.store.get_state(app_id)
    assert state is not None and state.epoch == run.epoch
    comp.store.release_app(app_id, run.epoch)
    comp.store.close()


def test_the_cohort_opens_its_store_through_a_cut_inside_the_budget(
    pg_url, proxy, tmp_path, monkeypatch
):
    """A scheduled cohort run that starts while the store is cut waits for it, then plans."""
    from psycopg.conninfo import conninfo_to_dict

    from fleet.settings import get_settings
    from flows.cohort import cohort_components
    from tests.helpers import demo_fleet

    params = conninfo_to_dict(pg_url)
    user = params.get("user") or "postgres"
    monkeypatch.setenv(
        "FLEET_STORE_URL", f"postgresql://{user}@127.0.0.1:{proxy.port}/{params['dbname']}"
    )
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLEET_CONFIG_BLOCK", raising=False)
    get_settings.cache_clear()
    fleet_file = demo_fleet(tmp_path)
    proxy.cut()
    restorer = threading.Timer(2.0, proxy.restore)
    restorer.start()
    started = time.monotonic()
    try:
        comp = asyncio.run(cohort_components(str(fleet_file)))
    finally:
        restorer.join()
        get_settings.cache_clear()
    assert 2.0 <= time.monotonic() - started < 15
    assert isinstance(comp.store.list_states(), list)  # the store answers through the proxy
    comp.store.close()
