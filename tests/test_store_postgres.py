"""The Store contract on the real PostgreSQL, plus connection handling only a server store has."""

from __future__ import annotations

import traceback

import psycopg
import pytest

from fleet.errors import StoreUnavailable
from fleet.store import open_store
from fleet.store.postgres import PostgresStore, redact
from tests.store_contract import (
    T0,
    StoreContract,
    assert_state_survived,
    write_state_to_survive,
)

TABLES = (
    "app_evolution_states, app_evolution_tasks, trajectories, fleet_config, cohorts, fleet_leases, "
    "app_effects, work_ledger"
)


@pytest.fixture(scope="module")
def pg_store(pg_url):
    s = PostgresStore(pg_url)  # applies supabase/migrations once for the module
    yield s
    s.close()


@pytest.fixture
def store(pg_store, pg_url):
    # TRUNCATE is far cheaper than a fresh database per test.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES}")
    return pg_store


class TestPostgresStore(StoreContract):
    pass


def test_open_store_picks_postgres_and_state_survives_reopening(pg_url, store):
    first = open_store(pg_url)
    written = write_state_to_survive(first)
    first.close()
    second = PostgresStore(pg_url, apply_schema=False)
    assert_state_survived(second, written)
    assert isinstance(first, PostgresStore)
    second.close()


def test_the_store_makes_concurrent_calls_on_as_many_connections_as_configured(pg_url, store):
    import threading

    from fleet.settings import FleetSettings

    three = open_store(pg_url, settings=FleetSettings(store_connections=3))
    inside = threading.Barrier(3, timeout=10)  # broken unless three calls are in at once
    try:
        threads = [
            threading.Thread(target=three._db.run, args=(lambda conn: inside.wait(),))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not inside.broken
    finally:
        three.close()


def _terminate_backends(pg_url: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'fleet' "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def test_reads_survive_a_dropped_connection(pg_url, store):
    store.ensure_apps(["app-a"], T0)
    assert _terminate_backends(pg_url) >= 1
    # The first call finds the connection dead, reopens it and repeats the read.
    assert store.get_state("app-a").app_id == "app-a"


def test_a_claim_is_not_repeated_after_a_dropped_connection(pg_url, store):
    store.ensure_apps(["app-a"], T0)
    store.get_state("app-a")  # make sure the connection is open before killing it
    assert _terminate_backends(pg_url) >= 1
    with pytest.raises(StoreUnavailable, match="connection lost"):
        store.claim_app("app-a", "h", "r", T0, 60)
    # The next call reconnects; the claim never ran twice.
    assert store.claim_app("app-a", "h", "r", T0, 60) == 1


def test_sql_function_refusals_map_to_domain_errors(store):
    from fleet.errors import InvalidTransition, StaleLease
    from fleet.models import Stage

    store.ensure_apps(["app-a"], T0)
    epoch = store.claim_app("app-a", "h", "r", T0, 60)
    with pytest.raises(StaleLease, match=r"epoch 99 no longer owns it \(current epoch 1\)") as err:
        store.set_stage("app-a", Stage.SKILL_RUNNING, 99, T0)
    assert not str(err.value).startswith("stale_lease")
    with pytest.raises(
        InvalidTransition,
        match="stage queued cannot move to complete; allowed: failed, queued, skillRunning",
    ):
        store.set_stage("app-a", Stage.COMPLETE, epoch, T0)
    with pytest.raises(StaleLease):
        store.set_stage("missing-app", Stage.SKILL_RUNNING, epoch, T0)


def test_leadership_lease_through_the_store(store):
    from datetime import timedelta

    assert store.acquire_lease("leader", "cloud-vm", T0, 15) == 1
    assert store.acquire_lease("leader", "mac1", T0 + timedelta(seconds=5), 15) is None
    assert store.release_lease("leader", "cloud-vm", 1, T0 + timedelta(seconds=6))
    assert store.acquire_lease("leader", "mac1", T0 + timedelta(seconds=6), 15) == 2
    assert not store.release_lease("leader", "cloud-vm", 1, T0 + timedelta(seconds=7))


def test_connection_failure_names_the_host_but_never_the_password():
    secret = "s3cr3t-Pa55word"
    conninfo = f"postgresql://fleet:{secret}@127.0.0.1:1/fleet"  # port 1: nothing listens
    with pytest.raises(StoreUnavailable) as err:
        PostgresStore(conninfo, connect_timeout=2)
    shown = str(err.value) + repr(err.value) + "".join(traceback.format_exception(err.value))
    assert "127.0.0.1:1/fleet" in shown
    assert secret not in shown


def test_repr_and_errors_never_show_the_password(pg_url):
    secret = "an0ther-s3cret"
    # Trust authentication ignores the password, so the store opens; its repr must not show it.
    with_password = pg_url.replace("postgres@", f"postgres:{secret}@", 1)
    s = PostgresStore(with_password, apply_schema=False)
    try:
        assert secret not in repr(s) and "127.0.0.1" in repr(s)
    finally:
        s.close()
    keyword_form = f"host=127.0.0.1 port=1 dbname=x user=u password={secret} connect_timeout=2"
    with pytest.raises(StoreUnavailable) as err:
        PostgresStore(keyword_form, apply_schema=False, connect_timeout=2)
    assert secret not in "".join(traceback.format_exception(err.value))


def test_redact_masks_every_password_form():
    assert redact("postgresql://u:pw@h/db failed") == "postgresql://u:***@h/db failed"
    assert redact("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact("server said pw-xyz", "pw-xyz") == "server said ***"


def test_block_opens_the_conninfo_only_in_get_client(pg_url, store):
    from pydantic import SecretStr

    from blocks.store import PostgresStoreBlock

    secret = "bl0ck-secret"
    block = PostgresStoreBlock(
        conninfo=pg_url.replace("postgres@", f"postgres:{secret}@", 1), apply_schema=False
    )
    assert isinstance(block.conninfo, SecretStr)
    assert secret not in repr(block) and secret not in str(block.model_dump())
    client = block.get_client()
    try:
        assert isinstance(client, PostgresStore) and secret not in repr(client)
        client.ensure_apps(["app-a"], T0)
        assert store.get_state("app-a") is not None
    finally:
        client.close()


def test_malformed_conninfo_is_a_config_error_without_the_password():
    from fleet.errors import ConfigError

    secret = "T0P-SECRET"
    # (a variable: tracebacks quote source lines)
    conninfo = f"host=127.0.0.1 password={secret} bogus_opt=1"
    with pytest.raises(ConfigError, match='invalid connection option "bogus_opt"') as err:
        PostgresStore(conninfo)
    assert secret not in "".join(traceback.format_exception(err.value))


def test_claims_on_separate_connections_never_exceed_max_in_flight(pg_url, store):
    """Two cohort runs in different processes: each claimer has its own connection."""
    from tests.store_contract import T0, claim_all_at_once

    apps = [f"race-{i}" for i in range(6)]
    store.ensure_apps(apps, T0)
    stores = [PostgresStore(pg_url, apply_schema=False) for _ in apps]
    try:
        results = claim_all_at_once(lambda i: stores[i], apps, max_in_flight=2)
    finally:
        for s in stores:
            s.close()
    assert sum(1 for r in results if r is not None) == 2
    assert sum(1 for s in store.list_states() if s.owner) == 2


def test_durable_functions_are_volatile_and_not_for_public(store, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT proname, provolatile, coalesce(proacl::text, '') AS acl FROM pg_proc "
            "WHERE proname IN ('fleet_renew_claim', 'fleet_record_effect', 'fleet_reset_app')"
        ).fetchall()
        table_acl = conn.execute(
            "SELECT coalesce(relacl::text, ''), relrowsecurity FROM pg_class "
            "WHERE relname = 'app_effects'"
        ).fetchone()
    assert {r[0] for r in rows} == {"fleet_renew_claim", "fleet_record_effect", "fleet_reset_app"}
    for name, volatility, acl in rows:
        assert volatility == "v", name
        # An ACL entry "=X/owner" would be PUBLIC's EXECUTE right; NULL means the default (PUBLIC).
        assert acl and "{=X" not in acl and ",=X" not in acl, (name, acl)
    assert "=r" not in table_acl[0] and table_acl[1] is True


def test_the_durable_migration_is_re_runnable(store, pg_url):
    from fleet.store.migrations import apply_migrations

    store.ensure_apps(["app-a"], T0)
    epoch = store.claim_app("app-a", "h", "r", T0, 60)
    store.record_effect("app-a", "skill/1/x", "spawn", "t-1", epoch, T0)
    apply_migrations(pg_url, force=True)
    assert store.get_effect("app-a", "skill/1/x").value == "t-1"


def test_two_runs_recording_one_effect_at_once_agree_on_the_first(pg_url, store):
    import threading

    store.ensure_apps(["app-a"], T0)
    epoch = store.claim_app("app-a", "h", "r", T0, 60)
    stores = [PostgresStore(pg_url, apply_schema=False) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    answers: list[str] = []

    def record(i: int) -> None:
        barrier.wait()
        value = stores[i].record_effect("app-a", "skill/1/x", "spawn", f"task-{i}", epoch, T0)
        answers.append(value)

    threads = [threading.Thread(target=record, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(answers) == 4 and len(set(answers)) == 1
    assert store.get_effect("app-a", "skill/1/x").value == answers[0]
