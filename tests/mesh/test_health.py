"""The node agent's health endpoint: what it binds and the URL it advertises to other machines."""

from __future__ import annotations

import socket
from datetime import UTC

import httpx
import typer

from fleet.clients.transport import is_loopback
from fleet.clock import ManualClock
from fleet.mesh import health
from fleet.mesh.agent import NodeAgent
from fleet.mesh.cli import agent_app
from fleet.mesh.health import HealthServer, reachable_host_name
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.settings import FleetSettings


def snapshot() -> dict:
    return {"status": "ok"}


def test_a_wildcard_bind_is_advertised_under_this_hosts_name_never_loopback():
    server = HealthServer(snapshot, host="0.0.0.0", port=0).start()
    try:
        assert server.url == f"http://{reachable_host_name()}:{server.port}/health"
        assert not is_loopback(httpx.URL(server.url).host)
        # Bound on every interface: loopback answers too.
        assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).json() == {
            "status": "ok"
        }
    finally:
        server.stop()


def test_a_host_whose_fqdn_is_localhost_advertises_its_host_name(monkeypatch):
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "mac3")
    server = HealthServer(snapshot, host="0.0.0.0", port=9300)
    assert server.url == "http://mac3:9300/health"


def test_a_host_with_only_loopback_names_advertises_its_outward_address(monkeypatch):
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost.localdomain")

    class Probe:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def connect(self, address: tuple[str, int]) -> None:
            assert address == health._ROUTE_PROBE  # never a real peer: nothing is sent

        def getsockname(self) -> tuple[str, int]:
            return ("10.1.2.3", 40000)

    monkeypatch.setattr(socket, "socket", Probe)
    url = HealthServer(snapshot, host="::", port=9300).url
    assert url == "http://10.1.2.3:9300/health" and not is_loopback(httpx.URL(url).host)


def test_with_no_network_at_all_the_url_is_loopback_and_the_cli_says_so(monkeypatch):
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")

    def unreachable(*args: object) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "socket", unreachable)
    url = HealthServer(snapshot, host="0.0.0.0", port=9300).url
    # Pinned: nothing better exists, so the URL stays loopback; `fleet agent start` warns on
    # any loopback health URL (mesh/cli.py, through transport.is_loopback).
    assert url == "http://localhost:9300/health" and is_loopback(httpx.URL(url).host)


def test_the_endpoint_answers_only_get_on_its_path():
    server = HealthServer(snapshot, host="127.0.0.1", port=0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/", timeout=2).json() == {"status": "ok"}
        assert httpx.get(f"{base}/nope", timeout=2).status_code == 404
        assert httpx.post(f"{base}/health", timeout=2).status_code == 405
    finally:
        server.stop()


def test_an_explicit_advertised_host_is_what_other_machines_get():
    server = HealthServer(snapshot, host="127.0.0.1", port=0, advertise_host="mac3.tailnet").start()
    try:
        assert server.url == f"http://mac3.tailnet:{server.port}/health"
        assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).status_code == 200
    finally:
        server.stop()
    ipv6 = HealthServer(snapshot, host="::", port=9300, advertise_host="fd00::3")
    assert ipv6.url == "http://[fd00::3]:9300/health"


def test_agent_and_cli_default_to_a_url_other_hosts_can_reach(tmp_path):
    agent = NodeAgent(
        MachineIdentity(machine_id="mac3", mesh_id="prod", role="viewer"),
        SQLiteMeshStore(tmp_path / "m.db"),
        panes=None,
        clock=ManualClock(),
        settings=FleetSettings(mesh_id=""),
        agent_command=[],
        state_path=tmp_path / "s.json",
        health_port=9300,
    )
    assert agent.health_url == f"http://{reachable_host_name()}:9300/health"
    named = NodeAgent(
        MachineIdentity(machine_id="mac4", mesh_id="prod", role="viewer"),
        SQLiteMeshStore(tmp_path / "m.db"),
        panes=None,
        clock=ManualClock(),
        settings=FleetSettings(mesh_id=""),
        agent_command=[],
        state_path=tmp_path / "s4.json",
        health_port=9300,
        advertise_host="mac4.lan",
    )
    assert named.health_url == "http://mac4.lan:9300/health"

    start = typer.main.get_command(agent_app).commands["start"]
    options = {p.name: p for p in start.params}
    assert options["health_host"].default == "0.0.0.0"
    assert options["advertise_host"].default is None  # then FLEET_AGENT_ADVERTISE_HOST (settings)


def test_advertised_host_comes_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_AGENT_ADVERTISE_HOST", "mac5.tailnet")
    agent = NodeAgent(
        MachineIdentity(machine_id="mac5", mesh_id="prod", role="viewer"),
        SQLiteMeshStore(tmp_path / "m.db"),
        panes=None,
        clock=ManualClock(),
        settings=FleetSettings(mesh_id=""),
        agent_command=[],
        state_path=tmp_path / "s.json",
        health_port=9300,
    )
    assert agent.health_url == "http://mac5.tailnet:9300/health"


def test_mesh_command_shows_machines_and_the_queue_as_the_store_has_them(tmp_path):
    from datetime import datetime, timedelta

    from typer.testing import CliRunner

    db = tmp_path / "mesh.db"
    store, now = SQLiteMeshStore(db), datetime.now(UTC)
    store.heartbeat(
        MachineIdentity(machine_id="mac1", mesh_id="prod"), now, "http://mac1:9300/health", []
    )
    store.heartbeat(
        MachineIdentity(machine_id="mac2", mesh_id="prod", role="viewer"), now, None, []
    )
    for i in range(3):
        store.enqueue("skill", ["t", str(i)], now - timedelta(minutes=5))
    store.claim("mac1", now)
    store.close()
    result = CliRunner().invoke(
        agent_app, ["mesh", "--store-url", f"sqlite:///{db}"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "mac1" in result.output and "mac2" in result.output and "viewer" in result.output
    assert (
        "queued 2" in result.output
        and "claimed 1" in result.output
        and "dead_letter 0" in result.output
    )
    assert "oldest queued 5 min" in result.output


def test_mesh_command_on_an_unreachable_store_says_so():
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        agent_app, ["mesh", "--store-url", "postgresql://nobody@127.0.0.1:9/none"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "127.0.0.1:9" in result.output


def test_a_broken_snapshot_still_answers_with_the_error():
    def broken() -> dict:
        raise RuntimeError("store gone")

    server = HealthServer(broken, host="127.0.0.1", port=0).start()
    try:
        answer = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
        assert answer.status_code == 500
        assert answer.json() == {"status": "error", "error": "RuntimeError: store gone"}
    finally:
        server.stop()
