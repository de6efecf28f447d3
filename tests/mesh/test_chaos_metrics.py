"""Chaos faults start and revert against real parts; metrics render from a real store; the
quarantine CLI lists and lifts."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fleet import metrics
from fleet.errors import ConfigError, StoreUnavailable
from fleet.mesh import chaos
from fleet.mesh.health import HealthServer
from fleet.mesh.immune import Action, ImmunePolicy, Subject, SubjectState, Tier
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]


def test_durations_parse_or_fail_clearly():
    assert chaos.parse_duration("60s") == 60 and chaos.parse_duration("5m") == 300
    assert chaos.parse_duration("2") == 2
    with pytest.raises(ConfigError, match="like 60s"):
        chaos.parse_duration("soon")


def test_store_outage_locks_the_sqlite_store_until_reverted(tmp_path):
    db = tmp_path / "mesh.db"
    store = SQLiteMeshStore(db, busy_timeout_seconds=0.2)
    fault = chaos.inject("store-outage", store_url=f"sqlite:///{db}")
    with pytest.raises(StoreUnavailable):
        store.heartbeat(MachineIdentity(machine_id="m", mesh_id="x"), T0, None, [])
    chaos.run(fault, 0)
    store.heartbeat(MachineIdentity(machine_id="m", mesh_id="x"), T0, None, [])
    assert fault.reverted and [m.machine_id for m in store.machines()] == ["m"]
    store.close()


def test_store_outage_on_postgres_is_store_unavailable_until_reverted(mesh_pg_url):
    from fleet.mesh.pg_store import PgMeshStore

    fault = chaos.inject("store-outage", store_url=mesh_pg_url)
    store = PgMeshStore(mesh_pg_url, lock_timeout_seconds=0.3)
    try:
        with pytest.raises(StoreUnavailable):
            store.machines()
    finally:
        fault.revert()
    store.machines()
    store.close()


def test_drop_machine_stops_the_agent_process_and_resumes_it():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fault = chaos.inject("drop-machine", target=str(proc.pid))
        time.sleep(0.1)
        assert _state(proc.pid) == "T"
        fault.revert()
        time.sleep(0.1)
        assert _state(proc.pid) in ("S", "R")
    finally:
        proc.kill()
        proc.wait()


def test_cpu_spike_runs_busy_processes_until_reverted():
    fault = chaos.inject("cpu-spike", target="1")
    [pid] = fault.detail["pids"]
    assert Path(f"/proc/{pid}").exists()
    chaos.run(fault, 0.05)
    assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"


def test_gateway_errors_make_the_dev_gateway_answer_503_until_reverted():
    from fleet.devservers.aura import AuraDevServer

    server = AuraDevServer().start()
    try:
        fault = chaos.inject("gateway-errors", gateway_url=server.url)
        assert httpx.get(server.url + "/tasks/nope").status_code == 503
        fault.revert()
        assert httpx.get(server.url + "/tasks/nope").status_code == 404
    finally:
        server.stop()


def test_an_unknown_fault_is_one_clear_error():
    with pytest.raises(ConfigError, match="one of kill-pane"):
        chaos.inject("meteor")


def _quarantined_store(path) -> SQLiteMeshStore:
    store = SQLiteMeshStore(path)
    store.heartbeat(MachineIdentity(machine_id="m1", mesh_id="x"), T0, None, [])
    store.enqueue("skill", ["x"], T0, task_id="t")
    now = datetime.now(UTC)
    s = SubjectState(
        Subject.machine("m1"),
        tier=Tier.HARD,
        ejections=1,
        until=now + timedelta(minutes=10),
        reason="5 failures",
        changed_at=now,
    )
    store.save_immune(
        [s], [Action("quarantine", s.subject, s.tier, {"ejections": 1})], ImmunePolicy(), now
    )
    return store


def test_metrics_render_queue_quarantines_and_mttr_from_the_store(tmp_path):
    store = _quarantined_store(tmp_path / "m.db")
    now = datetime.now(UTC)
    text = metrics.render(metrics.mesh_metrics(store, now)).decode()
    got = {(n, tuple(sorted(lab.items()))): v for n, lab, v in metrics.samples(text)}
    assert got[("fleet_mesh_queue_depth", (("status", "queued"),))] == 1
    assert got[("fleet_mesh_quarantines", (("kind", "machine"), ("tier", "2")))] == 1
    store.lift(Subject.machine("m1"), now + timedelta(seconds=30))
    text = metrics.render(metrics.mesh_metrics(store, now)).decode()
    got = {(n, tuple(sorted(lab.items()))): v for n, lab, v in metrics.samples(text)}
    assert got[("fleet_mesh_mttr_seconds", (("kind", "machine"),))] == pytest.approx(30, abs=1)
    assert got[("fleet_mesh_false_positive_quarantines", ())] == 1
    store.close()


def test_the_health_server_serves_metrics(tmp_path):
    db = tmp_path / "m.db"
    _quarantined_store(db).close()
    endpoint = metrics.metrics_endpoint(lambda: SQLiteMeshStore(db), lambda: datetime.now(UTC))
    server = HealthServer(
        lambda: {"status": "ok"}, host="127.0.0.1", port=0, metrics=endpoint
    ).start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/metrics")
        assert response.status_code == 200
        assert "fleet_mesh_quarantines" in response.text
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").json() == {"status": "ok"}
    finally:
        server.stop()


def test_quarantine_cli_lists_and_lifts(tmp_path):
    from fleet.cli import app

    db = tmp_path / "m.db"
    _quarantined_store(db).close()
    url = f"sqlite:///{db}"
    runner = CliRunner()
    listed = runner.invoke(app, ["mesh", "quarantine", "list", "--store-url", url])
    assert listed.exit_code == 0 and "machine:m1" in listed.output
    lifted = runner.invoke(app, ["mesh", "quarantine", "lift", "machine:m1", "--store-url", url])
    assert lifted.exit_code == 0 and "lifted" in lifted.output
    again = runner.invoke(app, ["mesh", "quarantine", "lift", "machine:m1", "--store-url", url])
    assert again.exit_code == 1 and "not in quarantine" in again.output
    assert (
        runner.invoke(app, ["mesh", "quarantine", "list", "--store-url", url]).output.strip()
        == "no quarantines"
    )
    pulled = runner.invoke(app, ["metrics", "pull", "--since", "5m", "--store-url", url])
    assert pulled.exit_code == 0 and "fleet_mesh_queue_depth" in pulled.output


def test_the_health_endpoint_can_require_a_bearer_token():
    from fleet.mesh.liveness import Reach, ReachabilityCheck

    server = HealthServer(
        lambda: {"status": "ok"}, host="127.0.0.1", port=0, metrics=lambda: b"x 1\n", token="s3cret"
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(base + "/health").status_code == 401
        assert httpx.get(base + "/metrics").status_code == 401
        assert (
            httpx.get(base + "/health", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        ok = httpx.get(base + "/health", headers={"Authorization": "Bearer s3cret"})
        assert ok.json() == {"status": "ok"}
        check = ReachabilityCheck(1)
        assert check(base + "/health") is Reach.REACHABLE  # a 401 still proves it is alive
        check.close()
    finally:
        server.stop()
