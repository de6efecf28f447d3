"""The tuning deployment's cycle (without the Prefect engine): evolve, then a canary — never a
direct apply — and one trial at a time."""

from __future__ import annotations

from datetime import UTC, datetime

from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.tuning.policies import open_policy_store
from flows.tuning import tune_once


def test_a_cycle_puts_the_best_candidate_on_a_canary_and_the_next_waits_for_it(tmp_path, tmp_home):
    path = tmp_path / "fleet.db"
    mesh = SQLiteMeshStore(path)
    now = datetime.now(UTC)
    for m in ("mac1", "mac2", "mac3", "mac4", "mac5"):
        mesh.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), now, None, [])
    url = f"sqlite:///{path}"
    first = tune_once(url, steps=2, since="6h", seed=1, population=4, now=now)
    policies = open_policy_store(url)
    # Deterministic under the seed: this one finds a faster candidate.
    assert first["front"] >= 1 and first["best"]["mttr"] < first["current_mttr"]
    trial = policies.running_trial()
    assert trial is not None and len(trial.machines) == 1
    assert first["canary"]["trial"] == trial.id
    # Never applied directly: everyone else stays on the baseline (the settings in force).
    active = policies.active()
    assert active is not None and active.figures == {"source": "settings"}
    second = tune_once(url, steps=2, since="6h", seed=1, population=4, now=now)
    assert second["verdict"].startswith("wait") and "front" not in second
