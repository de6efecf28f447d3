"""The app flow against real local AuraGateway- and Hydra-compatible servers, faults included."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from fleet.devservers.aura import AuraDevServer
from fleet.devservers.hydra import HydraDevServer
from fleet.models import Stage
from fleet.settings import get_settings
from fleet.store.sqlite import SQLiteStore
from fleet.wiring import reset_components
from tests.helpers import PY, demo_fleet

pytestmark = pytest.mark.usefixtures("prefect_harness")
AGENT = str(Path(__file__).resolve().parents[1] / "examples" / "demo" / "agent.py")
TOKEN = "aura-test-token-7f3a9c"
CHECK = [PY, "-m", "unittest", "discover", "-s", "tests", "-t", "."]


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """Gateway + Hydra dev servers and a fleet whose apps live only behind them."""
    path = demo_fleet(tmp_path)
    repos = path.parent / "repos"
    data = yaml.safe_load(path.read_text())
    for mode in ("skill", "review", "evolve"):
        data["commands"][mode] = [PY, AGENT, mode, f"{repos}/{{app_id}}", "{prompt}"]
    data["commands"]["ship"] = [PY, AGENT, "ship", f"{repos}/{{app_id}}"]
    for app in data["apps"]:
        del app["repo"], app["check"]  # remote apps: no local repo, Hydra is the gate
    path.write_text(yaml.safe_dump(data))
    aura = AuraDevServer(token=TOKEN, workdir=tmp_path / "gateway").start()
    hydra = HydraDevServer(token=TOKEN).start()
    for app in data["apps"]:
        hydra.set_check(app["id"], CHECK, cwd=repos / app["id"])
    db = tmp_path / "fleet.db"
    for name, value in {
        "FLEET_STORE_URL": f"sqlite:///{db}",
        "FLEET_HOME": str(tmp_path / "home"),
        "FLEET_AURA_URL": aura.url,
        "FLEET_AURA_TOKEN": TOKEN,
        "FLEET_HYDRA_URL": hydra.url,
        "FLEET_HYDRA_TOKEN": TOKEN,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    reset_components()
    yield aura, hydra, path, SQLiteStore(db)
    reset_components()
    get_settings.cache_clear()
    aura.stop()
    hydra.stop()


async def run_app(path: Path, app_id: str = "demo-calc"):
    from flows.app_evolution import evolve_app

    return await evolve_app(app_id, fleet_file=str(path), return_state=True)


async def test_app_flow_through_gateway_and_hydra(remote):
    aura, hydra, path, store = remote
    state = await run_app(path)
    assert state.is_completed(), state.message
    assert store.get_state("demo-calc").stage is Stage.COMPLETE
    assert len(store.list_tasks("demo-calc", "skill")) >= 3
    assert len(store.list_tasks("demo-calc", "adversarial")) >= 1
    dispatched = {(t.target, t.model) for t in aura.tasks() if t.target}
    assert dispatched == {("mac4", "codex"), ("mac1", "")}


async def test_a_5xx_burst_on_reads_is_absorbed_by_the_transport_retry(remote):
    aura, hydra, path, store = remote
    hydra.set_faults(fail_next=2, fail_status=503)
    state = await run_app(path)
    assert state.is_completed(), state.message


async def test_a_5xx_on_spawn_is_retried_under_its_key_and_nothing_runs_twice(remote):
    """POST /spawn may have started work: it is retried under its Idempotency-Key (issue 8:
    one 503 used to fail the app), and the gateway starts each stage's work once."""
    aura, hydra, path, store = remote
    aura.set_faults(fail_next=1, fail_status=503, after_effect=True)
    state = await run_app(path)
    assert state.is_completed()
    commands = [" ".join(t.argv) for t in aura.tasks()]
    assert len(commands) == len(set(commands))  # no stage's command was started twice


async def test_cohort_publishes_the_breaker_of_each_endpoint(remote):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.cohort import fleet_cohort

    aura, hydra, path, store = remote
    await fleet_cohort(fleet_file=str(path), size=1)
    async with get_client() as client:
        [table] = await client.read_artifacts(  # the newest: other cohort runs publish one too
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fleet-breakers"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert f"aura {aura.url}" in str(table.data) and f"hydra {hydra.url}" in str(table.data)


async def test_a_refused_token_fails_the_app_with_the_cause_and_no_secret(remote, caplog):
    aura, hydra, path, store = remote
    aura.set_faults(reject_auth=True)
    with caplog.at_level(logging.DEBUG):
        state = await run_app(path)
    assert state.is_failed()
    app = store.get_state("demo-calc")
    assert app.stage is Stage.FAILED and "401" in app.error
    assert TOKEN not in app.error and TOKEN not in caplog.text and TOKEN not in str(state.message)
    assert store.list_tasks("demo-calc") == []


async def test_a_gateway_task_that_never_finishes_times_out(remote, monkeypatch):
    aura, hydra, path, store = remote
    monkeypatch.setenv("FLEET_SKILL_TIMEOUT_SECONDS", "1")
    get_settings.cache_clear()
    aura.set_faults(stall_next_tasks=10)
    state = await run_app(path)
    assert state.is_failed()
    assert "still running after 1 s" in store.get_state("demo-calc").error


async def test_a_hydra_that_never_passes_hits_the_hard_stop(remote, monkeypatch):
    aura, hydra, path, store = remote
    monkeypatch.setenv("FLEET_HYDRA_HARD_STOP_SECONDS", "2")
    get_settings.cache_clear()
    hydra.set_status("demo-calc", phase="evolving", cycle=3, is_passing=False)
    state = await run_app(path)
    assert state.is_failed()
    assert store.get_state("demo-calc").error.startswith("Hydra timeout")
    [trajectory] = store.list_trajectories("demo-calc")
    assert trajectory.outcome == "failure"


async def test_saved_blocks_select_the_gateway_and_hydra(remote, monkeypatch):
    from blocks.integrations import AuraGatewayBlock, HydraBlock

    aura, hydra, path, store = remote
    await AuraGatewayBlock(url=aura.url, token=TOKEN).asave("remote-test", overwrite=True)
    await HydraBlock(url=hydra.url, token=TOKEN).asave("remote-test", overwrite=True)
    for name in ("FLEET_AURA_URL", "FLEET_AURA_TOKEN", "FLEET_HYDRA_URL", "FLEET_HYDRA_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLEET_AURA_BLOCK", "fleet-aura-gateway/remote-test")
    monkeypatch.setenv("FLEET_HYDRA_BLOCK", "fleet-hydra/remote-test")
    get_settings.cache_clear()
    state = await run_app(path)
    assert state.is_completed(), state.message
    modes = [t.argv[2] for t in aura.tasks()]
    assert sorted(modes) == ["evolve", "review", "ship", "skill"]
