"""FLEET_DISPATCHER=mesh runs the pipeline's agent work on our node agents via the mesh store."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.errors import ConfigError
from fleet.mesh.dispatcher import MeshDispatcher
from fleet.mesh.open import mesh_store_url
from fleet.settings import FleetSettings
from fleet.wiring import build_dispatcher


async def test_the_mesh_dispatcher_is_selected_and_scopes_its_tasks_to_the_mesh(tmp_path):
    settings = FleetSettings(
        dispatcher="mesh", store_url=f"sqlite:///{tmp_path / 'f.db'}", mesh_id="prod"
    )
    dispatcher = build_dispatcher(settings)
    assert isinstance(dispatcher, MeshDispatcher)
    task_id = await dispatcher.spawn(["claude", "-p", "hello"])
    task = dispatcher.store.get_task(task_id)
    assert (task.mesh_id, task.generation) == ("prod", 1)
    dispatcher.store.close()


def test_an_unknown_dispatcher_is_refused():
    with pytest.raises(ValidationError):
        FleetSettings(dispatcher="carrier-pigeon")


def test_the_mesh_store_follows_the_store_block():
    class Block:
        from pydantic import SecretStr

        conninfo = SecretStr("postgresql://u@db:5432/fleet")

    settings = FleetSettings(store_block="fleet-postgres-store/prod")
    assert mesh_store_url(settings, lambda name: Block()) == "postgresql://u@db:5432/fleet"
    with pytest.raises(ConfigError, match="no database connection string"):
        mesh_store_url(settings, lambda name: object())
    with pytest.raises(ConfigError, match="inside a flow run"):
        mesh_store_url(settings)


def test_a_process_shares_its_breaker_states_through_the_mesh_store(tmp_path):
    from fleet.clients import breaker as breaker_module
    from fleet.clients.breaker import CircuitBreaker, stop_sharing_states
    from fleet.mesh.open import share_breaker_states
    from fleet.mesh.sqlite_store import SQLiteMeshStore

    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert share_breaker_states(FleetSettings(store_url=url))
    try:
        b = CircuitBreaker("shared-gateway", failure_threshold=1)
        b.record_failure("503")
    finally:
        stop_sharing_states()
        with breaker_module._REGISTRY_LOCK:
            breaker_module._REGISTRY.pop("shared-gateway", None)
    store = SQLiteMeshStore(tmp_path / "f.db")
    assert [(r["name"], r["state"]) for r in store.breaker_rows()] == [("shared-gateway", "open")]
    store.close()
    assert not share_breaker_states(FleetSettings(store_block="fleet-postgres-store/x"))
