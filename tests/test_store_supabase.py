"""SupabaseStore at the HTTP layer (respx): the exact PostgREST requests, the response mapping,
the error mapping, and that the service key never shows outside the Authorization headers."""

from __future__ import annotations

import json
import logging
import traceback
from datetime import timedelta

import httpx
import pytest
import respx

from fleet.errors import ConfigError, InvalidTransition, StaleLease, StoreUnavailable
from fleet.models import FleetConfig, Stage, Task, Trajectory
from fleet.settings import FleetSettings
from fleet.store import open_store
from fleet.store.supabase_rest import SupabaseStore
from tests.postgrest_fake import PostgrestOverPostgres
from tests.store_contract import T0, StoreContract

URL = "https://proj.supabase.co"
KEY = "service-role-key.eyJzZWNyZXQiOnRydWV9.sig"
REST = "/rest/v1"


@pytest.fixture
def api():
    # Every request must match a route: an unexpected call fails the test.
    with respx.mock(base_url=URL + REST, assert_all_called=False, assert_all_mocked=True) as mock:
        yield mock


@pytest.fixture
def store(api):
    s = SupabaseStore(URL, KEY)
    yield s
    s.close()


def sent(route) -> httpx.Request:
    assert route.call_count == 1, f"expected one call, got {route.call_count}"
    return route.calls.last.request


def body(request: httpx.Request):
    return json.loads(request.content)


def prefer(request: httpx.Request) -> set[str]:
    return set(request.headers.get("prefer", "").split(","))


# What PostgREST sends for a function that returned SQL NULL (httpx's json=None sends no body).
def null() -> httpx.Response:
    return httpx.Response(200, content=b"null", headers={"Content-Type": "application/json"})


def state_row(**kw) -> dict:
    row = {
        "app_id": "app-a",
        "stage": "queued",
        "error": None,
        "epoch": 0,
        "owner": None,
        "run_id": None,
        "lease_until": None,
        "stage_started_at": None,
        "updated_at": "2026-03-25T12:00:00+00:00",
    }
    return {**row, **kw}


def api_error(code: str, message: str, status: int = 400) -> httpx.Response:
    return httpx.Response(
        status, json={"code": code, "message": message, "details": None, "hint": None}
    )


# App states and claims ---------------------------------------------------------------
def test_ensure_apps_upserts_ignoring_duplicates(store, api):
    route = api.post("/app_evolution_states").respond(201)
    store.ensure_apps(["app-a", "app-b", "app-a"], T0)
    req = sent(route)
    assert req.url.params["on_conflict"] == "app_id"
    assert prefer(req) == {"return=minimal", "resolution=ignore-duplicates"}
    assert body(req) == [
        {"app_id": "app-a", "updated_at": "2026-03-25T12:00:00+00:00"},
        {"app_id": "app-b", "updated_at": "2026-03-25T12:00:00+00:00"},
    ]
    # The key travels in the auth headers only.
    assert req.headers["apikey"] == KEY and req.headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in str(req.url)


def test_get_state_filters_by_app_id(store, api):
    route = api.get("/app_evolution_states", params={"app_id": "eq.app-a", "select": "*"}).mock(
        side_effect=[
            httpx.Response(
                200,
                json=[
                    state_row(
                        stage="hydraBuild",
                        epoch=4,
                        owner="h",
                        lease_until="2026-03-25T13:00:00+00:00",
                    )
                ],
            ),
            httpx.Response(200, json=[]),
        ]
    )
    state = store.get_state("app-a")
    assert (state.stage, state.epoch, state.owner) == (Stage.HYDRA_BUILD, 4, "h")
    assert state.lease_until == T0 + timedelta(hours=1)
    assert store.get_state("app-a") is None
    assert route.call_count == 2


def test_list_states_pages_through_every_row(api):
    store = SupabaseStore(URL, KEY, page_size=2)
    route = api.get("/app_evolution_states").mock(
        side_effect=[
            httpx.Response(200, json=[state_row(app_id="a1"), state_row(app_id="a2")]),
            httpx.Response(200, json=[state_row(app_id="a3")]),
        ]
    )
    assert [s.app_id for s in store.list_states()] == ["a1", "a2", "a3"]
    first, second = (c.request.url.params for c in route.calls)
    assert (first["order"], first["limit"], first["offset"]) == ("app_id.asc", "2", "0")
    assert (second["limit"], second["offset"]) == ("2", "2")


def test_claim_goes_through_the_claim_function(store, api):
    route = api.post("/rpc/fleet_claim_app").mock(side_effect=[httpx.Response(200, json=3), null()])
    assert store.claim_app("app-a", "host:1", "run-1", T0, 600, steal_from="host:0") == 3
    assert body(route.calls[0].request) == {
        "p_app_id": "app-a",
        "p_owner": "host:1",
        "p_run_id": "run-1",
        "p_now": "2026-03-25T12:00:00+00:00",
        "p_lease_seconds": 600.0,
        "p_steal_from": "host:0",
        "p_max_in_flight": None,
    }
    assert store.claim_app("app-a", "host:2", "run-2", T0, 600) is None
    assert body(route.calls[1].request)["p_steal_from"] is None


def test_release_is_a_patch_conditional_on_the_epoch(store, api):
    route = api.patch(
        "/app_evolution_states", params={"app_id": "eq.app-a", "epoch": "eq.3"}
    ).respond(204)
    store.release_app("app-a", 3)
    req = sent(route)
    assert body(req) == {"owner": None, "lease_until": None}
    assert prefer(req) == {"return=minimal"}


def test_set_stage_returns_the_row_written_by_the_function(store, api):
    route = api.post("/rpc/fleet_set_stage").respond(
        200,
        json=state_row(
            stage="skillRunning",
            epoch=2,
            stage_started_at="2026-03-25T12:00:00+00:00",
            lease_until="2026-03-25T12:10:00+00:00",
        ),
    )
    state = store.set_stage("app-a", Stage.SKILL_RUNNING, 2, T0, lease_seconds=600)
    assert (state.stage, state.stage_started_at) == (Stage.SKILL_RUNNING, T0)
    assert body(sent(route)) == {
        "p_app_id": "app-a",
        "p_stage": "skillRunning",
        "p_epoch": 2,
        "p_now": "2026-03-25T12:00:00+00:00",
        "p_error": None,
        "p_lease_seconds": 600.0,
    }


def test_function_refusals_map_to_domain_errors(store, api):
    api.post("/rpc/fleet_set_stage").mock(
        side_effect=[
            api_error(
                "P0001",
                "stale_lease: stage write for app-a refused: epoch 1 no longer owns it "
                "(current epoch 2); another run has taken the app",
            ),
            api_error(
                "P0001",
                "invalid_transition: stage queued cannot move to complete; "
                "allowed: failed, queued, skillRunning",
            ),
            api_error("P0001", "some other raise"),
        ]
    )
    with pytest.raises(StaleLease, match=r"^stage write for app-a refused: epoch 1"):
        store.set_stage("app-a", Stage.SKILL_RUNNING, 1, T0)
    with pytest.raises(InvalidTransition, match="^stage queued cannot move to complete"):
        store.set_stage("app-a", Stage.COMPLETE, 2, T0)
    with pytest.raises(StoreUnavailable, match="P0001 some other raise"):
        store.set_stage("app-a", Stage.FAILED, 2, T0, error="boom")


def test_reset_goes_through_the_reset_function(store, api):
    route = api.post("/rpc/fleet_reset_app").respond(204)
    store.reset_app("app-a", T0)
    assert body(sent(route)) == {"p_app_id": "app-a", "p_now": "2026-03-25T12:00:00+00:00"}


# Tasks -------------------------------------------------------------------------------
def test_upsert_tasks_inserts_new_keys_then_refreshes_known_ones(store, api):
    old = Task(app_id="app-a", description="Fix the crash on launch.", priority=1)
    new = Task(
        app_id="app-a",
        source="adversarial",
        description="Validate input.",
        severity="high",
        priority=2,
        file="App/Main.swift",
    )
    route = api.post("/app_evolution_tasks").mock(
        side_effect=[
            httpx.Response(201, json=[{"task_key": new.key}]),  # only `new` was inserted
            httpx.Response(201),
        ]
    )
    assert store.upsert_tasks([old, new, old], T0) == 1
    insert, refresh = (c.request for c in route.calls)
    assert insert.url.params["on_conflict"] == "task_key"
    assert insert.url.params["select"] == "task_key"
    assert prefer(insert) == {"return=representation", "resolution=ignore-duplicates"}
    assert [r["task_key"] for r in body(insert)] == [old.key, new.key]
    assert body(insert)[1] == {
        "task_key": new.key,
        "app_id": "app-a",
        "source": "adversarial",
        "priority": 2,
        "description": "Validate input.",
        "severity": "high",
        "file": "App/Main.swift",
        "updated_at": "2026-03-25T12:00:00+00:00",
        "created_at": "2026-03-25T12:00:00+00:00",
    }
    assert refresh.url.params["on_conflict"] == "task_key"
    assert prefer(refresh) == {"return=minimal", "resolution=merge-duplicates"}
    [known] = body(refresh)
    assert known["task_key"] == old.key and known["priority"] == 1 and "created_at" not in known


def test_upsert_tasks_skips_the_refresh_when_all_keys_are_new(store, api):
    tasks = [Task(app_id="app-a", description=f"Issue {i}.") for i in range(3)]
    route = api.post("/app_evolution_tasks").respond(201, json=[{"task_key": t.key} for t in tasks])
    assert store.upsert_tasks(tasks, T0) == 3
    assert route.call_count == 1
    assert store.upsert_tasks([], T0) == 0


def test_list_tasks_filters_and_orders(store, api):
    route = api.get("/app_evolution_tasks").respond(
        200,
        json=[
            {
                "task_key": "k",
                "app_id": "app-a",
                "source": "adversarial",
                "priority": 2,
                "description": "Validate input.",
                "severity": "high",
                "file": "App/Main.swift",
                "created_at": "2026-03-25T12:00:00+00:00",
                "updated_at": "2026-03-25T12:00:00+00:00",
            },
        ],
    )
    [t] = store.list_tasks("app-a", source="adversarial")
    assert (t.source, t.severity, t.file, t.priority) == (
        "adversarial",
        "high",
        "App/Main.swift",
        2,
    )
    params = sent(route).url.params
    assert params["app_id"] == "eq.app-a" and params["source"] == "eq.adversarial"
    assert params["order"] == "priority.asc,created_at.asc,task_key.asc"


# Trajectories ------------------------------------------------------------------------
def test_record_trajectory_is_idempotent_on_app_and_run(store, api):
    route = api.post("/trajectories").respond(201)
    store.record_trajectory(
        Trajectory(
            app_id="app-a",
            run_id="r1",
            outcome="success",
            reward=1.0,
            durations={"skill": 1.5},
            created_at=T0,
        )
    )
    req = sent(route)
    assert req.url.params["on_conflict"] == "app_id,run_id"
    assert prefer(req) == {"return=minimal", "resolution=ignore-duplicates"}
    sent_row = body(req)
    assert (
        sent_row["durations"] == {"skill": 1.5}
        and sent_row["created_at"] == "2026-03-25T12:00:00+00:00"
    )
    assert (sent_row["outcome"], sent_row["reward"]) == ("success", 1.0)


def test_list_trajectories_and_reward_means(store, api):
    api.get(
        "/trajectories", params={"app_id": "eq.app-a", "order": "created_at.asc,run_id.asc"}
    ).respond(
        200,
        json=[
            {
                "app_id": "app-a",
                "run_id": "r1",
                "pipeline": "default",
                "skill_tasks": 3,
                "adversarial_issues": 1,
                "quality_score": None,
                "outcome": "success",
                "reward": 1.0,
                "durations": {"skill": 1.5},
                "error": None,
                "created_at": "2026-03-25T12:00:00+00:00",
            }
        ],
    )
    [t] = store.list_trajectories("app-a")
    assert t.durations == {"skill": 1.5} and t.created_at == T0
    means = api.post("/rpc/fleet_reward_means").respond(
        200, json=[{"app_id": "app-a", "reward_mean": 0.5}]
    )
    assert store.reward_means(["app-a", "app-c"]) == {"app-a": 0.5}
    assert body(sent(means)) == {"p_app_ids": ["app-a", "app-c"]}
    assert store.reward_means([]) == {}  # no request for nothing
    assert means.call_count == 1


# Config and cohorts ------------------------------------------------------------------
def test_fleet_config_roundtrip(store, api):
    api.get("/fleet_config").mock(
        side_effect=[
            httpx.Response(200, json=[]),
            httpx.Response(200, json=[{"key": "max_concurrent", "value": 7}]),
        ]
    )
    assert store.get_fleet_config() == FleetConfig()
    assert store.get_fleet_config().max_concurrent == 7
    route = api.post("/fleet_config").respond(201)
    store.set_fleet_config(FleetConfig(max_concurrent=7))
    req = sent(route)
    assert req.url.params["on_conflict"] == "key"
    assert prefer(req) == {"return=minimal", "resolution=merge-duplicates"}
    assert body(req) == [{"key": "max_concurrent", "value": 7}]


def test_cohorts_record_finish_and_count(store, api):
    record = api.post("/cohorts").respond(201)
    store.record_cohort("c1", ["app-a"], T0)
    req = sent(record)
    assert req.url.params["on_conflict"] == "run_id"
    assert "resolution=ignore-duplicates" in prefer(req)
    assert body(req) == {
        "run_id": "c1",
        "app_ids": ["app-a"],
        "started_at": "2026-03-25T12:00:00+00:00",
    }

    finish = api.patch("/cohorts", params={"run_id": "eq.c1", "finished_at": "is.null"}).respond(
        204
    )
    store.finish_cohort("c1", T0)
    assert body(sent(finish)) == {"finished_at": "2026-03-25T12:00:00+00:00"}

    count = api.head("/cohorts").respond(200, headers={"Content-Range": "*/3"})
    assert store.completed_cohorts() == 3
    req = sent(count)
    assert req.url.params["finished_at"] == "not.is.null" and req.url.params["app_ids"] == "neq.[]"
    assert "count=exact" in prefer(req)


def test_leases_go_through_the_lease_functions(store, api):
    acquire = api.post("/rpc/fleet_acquire_lease").mock(
        side_effect=[httpx.Response(200, json=2), null()]
    )
    assert store.acquire_lease("leader", "cloud-vm", T0, 15) == 2
    assert store.acquire_lease("leader", "mac1", T0, 15) is None
    assert body(acquire.calls[0].request) == {
        "p_name": "leader",
        "p_holder": "cloud-vm",
        "p_now": "2026-03-25T12:00:00+00:00",
        "p_lease_seconds": 15.0,
    }
    api.post("/rpc/fleet_release_lease").respond(200, json=True)
    assert store.release_lease("leader", "cloud-vm", 2, T0) is True


# Errors ------------------------------------------------------------------------------
def test_server_errors_and_outages_become_store_unavailable(store, api):
    claim = api.post("/rpc/fleet_claim_app").respond(503, text="upstream unavailable")
    with pytest.raises(StoreUnavailable, match="503"):
        store.claim_app("app-a", "h", "r", T0, 600)
    assert claim.call_count == 1  # a write is never repeated by the client

    api.get("/app_evolution_states").respond(500, json={"code": "XX000", "message": "internal"})
    with pytest.raises(StoreUnavailable, match="XX000 internal"):
        store.get_state("app-a")

    api.post("/rpc/fleet_reset_app").mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(StoreUnavailable, match="ConnectError: connection refused"):
        store.reset_app("app-a", T0)


def test_wrong_key_and_missing_schema_say_what_to_do(store, api):
    api.get("/fleet_config").mock(
        side_effect=[
            api_error("42501", "permission denied for table fleet_config", 401),
            api_error(
                "PGRST205",
                "Could not find the table 'public.fleet_config' in the schema cache",
                404,
            ),
        ]
    )
    with pytest.raises(StoreUnavailable, match="service_role key"):
        store.get_fleet_config()
    with pytest.raises(StoreUnavailable, match="apply supabase/migrations"):
        store.get_fleet_config()


def test_the_service_key_never_leaks(api, caplog):
    caplog.set_level(logging.DEBUG)
    store = SupabaseStore(URL, KEY)
    assert KEY not in repr(store) and "proj.supabase.co" in repr(store)
    # Even a server that echoes the key back has it masked in our exception.
    api.post("/rpc/fleet_claim_app").respond(
        400, json={"code": "P0001", "message": f"bad token {KEY}", "details": KEY}
    )
    with pytest.raises(StoreUnavailable) as err:
        store.claim_app("app-a", "h", "r", T0, 600)
    api.get("/app_evolution_states").mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(StoreUnavailable) as timeout:
        store.get_state("app-a")
    shown = "".join(
        traceback.format_exception(err.value) + traceback.format_exception(timeout.value)
    )
    assert "***" in shown and KEY not in shown
    assert caplog.records and KEY not in caplog.text


def test_urls_are_checked_before_any_request():
    with pytest.raises(ConfigError, match="unencrypted"):
        SupabaseStore("http://proj.example.com", KEY)
    assert SupabaseStore("http://127.0.0.1:54321", KEY).url == "http://127.0.0.1:54321"
    assert SupabaseStore("http://db.internal", KEY, allow_insecure=True).url == "http://db.internal"
    with pytest.raises(ConfigError, match="https://<project-ref>.supabase.co"):
        SupabaseStore("ftp://proj.supabase.co", KEY)
    with pytest.raises(ConfigError, match="FLEET_SUPABASE_KEY"):
        SupabaseStore(URL, "")


# open_store and the Block ------------------------------------------------------------
def test_open_store_builds_the_rest_store_from_settings():
    settings = FleetSettings(supabase_url=URL, supabase_key=KEY)
    for url in ("supabase", "supabase://proj.supabase.co", "https://proj.supabase.co/"):
        s = open_store(url, settings=settings)
        assert isinstance(s, SupabaseStore) and s.url == URL
        s.close()
    with pytest.raises(ConfigError, match="FLEET_SUPABASE_KEY") as err:
        open_store("supabase://proj.supabase.co", settings=FleetSettings())
    with pytest.raises(ConfigError, match="FLEET_SUPABASE_URL"):
        open_store("supabase", settings=FleetSettings(supabase_key=KEY))
    with pytest.raises(ConfigError, match="must not carry credentials") as err:
        open_store(f"https://user:{KEY}@proj.supabase.co", settings=settings)
    assert KEY not in str(err.value)


def test_block_opens_the_secret_only_in_get_client(api):
    from blocks.store import SupabaseStoreBlock

    block = SupabaseStoreBlock(url=URL, service_key=KEY)
    assert KEY not in repr(block) and KEY not in str(block.model_dump())
    client = block.get_client()
    assert isinstance(client, SupabaseStore) and client.url == URL
    route = api.get("/fleet_config").respond(200, json=[])
    client.get_fleet_config()
    assert sent(route).headers["apikey"] == KEY
    client.close()


# The shared Store contract, over PostgREST faked at the HTTP level -------------------
PIPELINE_TABLES = (
    "app_evolution_states, app_evolution_tasks, trajectories, fleet_config, cohorts, fleet_leases, "
    "app_effects, work_ledger"
)


@pytest.fixture(scope="module")
def pipeline_db(pg_url):
    from fleet.store.migrations import apply_migrations

    apply_migrations(pg_url)
    return pg_url


class TestSupabaseStoreContract(StoreContract):
    """Every request goes through httpx to a PostgREST stand-in that runs it on the real
    PostgreSQL (tests/postgrest_fake.py): the REST store's request building, paging, error
    mapping and the SQL functions it calls are all exercised."""

    @pytest.fixture
    def store(self, pipeline_db):
        import psycopg

        with psycopg.connect(pipeline_db, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {PIPELINE_TABLES}")
        fake = PostgrestOverPostgres(pipeline_db)
        with respx.mock(base_url=URL + REST, assert_all_mocked=True) as mock:
            mock.route().mock(side_effect=fake.handle)
            s = SupabaseStore(URL, KEY, page_size=2)  # small pages: every read pages
            yield s
            s.close()
        assert fake.requests, "the contract ran without a single request"
