"""The node agent's health endpoint: what it binds and the URL it advertises to other machines."""

from __future__ import annotations

import socket

import httpx
import typer

from fleet.clock import ManualClock
from fleet.mesh.agent import NodeAgent
from fleet.mesh.cli import agent_app
from fleet.mesh.health import HealthServer
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.settings import FleetSettings


def snapshot() -> dict:
    return {"status": "ok"}


def test_a_wildcard_bind_is_advertised_under_this_hosts_name_never_loopback():
    server = HealthServer(snapshot, host="0.0.0.0", port=0).start()
    try:
        assert server.url == f"http://{socket.getfqdn()}:{server.port}/health"
        assert "127.0.0.1" not in server.url
        # Bound on every interface: loopback answers too.
        assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).json() == {"status": "ok"}
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
    agent = NodeAgent(MachineIdentity(machine_id="mac3", mesh_id="prod", role="viewer"),
                      SQLiteMeshStore(tmp_path / "m.db"), panes=None, clock=ManualClock(),
                      settings=FleetSettings(mesh_id=""), agent_command=[],
                      state_path=tmp_path / "s.json", health_port=9300)
    assert agent.health_url == f"http://{socket.getfqdn()}:9300/health"
    named = NodeAgent(MachineIdentity(machine_id="mac4", mesh_id="prod", role="viewer"),
                      SQLiteMeshStore(tmp_path / "m.db"), panes=None, clock=ManualClock(),
                      settings=FleetSettings(mesh_id=""), agent_command=[],
                      state_path=tmp_path / "s4.json", health_port=9300, advertise_host="mac4.lan")
    assert named.health_url == "http://mac4.lan:9300/health"

    start = typer.main.get_command(agent_app).commands["start"]
    options = {p.name: p for p in start.params}
    assert options["health_host"].default == "0.0.0.0"
    assert options["advertise_host"].default is None  # then FLEET_AGENT_ADVERTISE_HOST (settings)


def test_advertised_host_comes_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_AGENT_ADVERTISE_HOST", "mac5.tailnet")
    agent = NodeAgent(MachineIdentity(machine_id="mac5", mesh_id="prod", role="viewer"),
                      SQLiteMeshStore(tmp_path / "m.db"), panes=None, clock=ManualClock(),
                      settings=FleetSettings(mesh_id=""), agent_command=[],
                      state_path=tmp_path / "s.json", health_port=9300)
    assert agent.health_url == "http://mac5.tailnet:9300/health"
