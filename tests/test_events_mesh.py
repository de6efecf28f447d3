"""The mesh deployments' events go through fleet.events, the one way the fleet emits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fleet import events

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sent(monkeypatch):
    """Record what reaches Prefect's emit_event, with a Prefect API configured."""
    import prefect.events
    from prefect.settings import PREFECT_API_URL, temporary_settings

    got: list[dict] = []

    def record(event, resource, related=None, payload=None):
        got.append({"event": event, "resource": resource, "payload": payload})
        return object()

    monkeypatch.setattr(prefect.events, "emit_event", record)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield got


def test_cycle_and_immune_events_have_their_names_and_resources(sent):
    assert events.reconciler_run({"orphaned_requeued": 2, "expired": 0})
    assert events.watchdog_run({"stale_machines": 1, "metabolism": None})
    assert events.immune_action("quarantine", "pane:mac1/%3", tier=2, detail={"until": "t"})
    assert not events.immune_action("corrective", "machine:mac1", tier=0)  # not announced
    assert [(e["event"], e["resource"]["prefect.resource.id"]) for e in sent] == [
        ("fleet.mesh.reconciler-run", "fleet.mesh"),
        ("fleet.mesh.watchdog-run", "fleet.mesh"),
        ("fleet.mesh.quarantine", "fleet.mesh.pane:mac1/%3"),
    ]
    assert sent[1]["payload"] == {"stale_machines": 1}  # None is left out
    assert sent[2]["payload"] == {"tier": 2, "until": "t"}


def test_the_mesh_flows_emit_only_through_fleet_events():
    tree = ast.parse((ROOT / "flows" / "mesh.py").read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert "emit_event" not in names
