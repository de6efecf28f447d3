"""The healing-tuner flow under the session Prefect harness."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.settings import get_settings
from fleet.tuning.policies import open_policy_store

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    monkeypatch.setenv("FLEET_STORE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


async def test_the_flow_evolves_on_anomaly_and_starts_only_a_canary(store_url, tmp_path):
    from flows.tuning import tune_healing

    mesh = SQLiteMeshStore(tmp_path / "fleet.db")
    now = datetime.now(UTC)
    for m in ("mac1", "mac2", "mac3"):
        mesh.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), now, None, [])
    summary = await tune_healing(
        steps=1, since="3h", seed=0, population=4, reason="recalibrate: machine:mac2"
    )
    assert summary["reason"] == "recalibrate: machine:mac2" and summary["front"] >= 1
    policies = open_policy_store(store_url)
    active = policies.active()
    # Whatever it found, nothing was applied mesh-wide: at most a canary on one machine.
    assert active is None or active.figures == {"source": "settings"}
    assert len(policies.assignments()) <= 1
