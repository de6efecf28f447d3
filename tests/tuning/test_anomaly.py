"""Tier 3 calls the tuner: the immune system's "recalibrate" becomes the event the
`healing-tuner/daily` deployment's trigger in prefect.yaml matches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

from fleet.mesh import immune
from fleet.mesh.immune import ImmunePolicy, Observation, Subject, SubjectState, Tier
from fleet.tuning import anomaly

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P = ImmunePolicy()
DEPLOYMENT_ID = uuid4()


def tuner_triggers() -> list:
    """The triggers of the deployment that runs the tuner, as `prefect deploy` validates them."""
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [tuner] = [
        d for d in config["deployments"] if d["entrypoint"] == "flows/tuning.py:tune_healing"
    ]
    triggers = _initialize_deployment_triggers(tuner["name"], tuner["triggers"])
    for trigger in triggers:
        trigger.set_deployment_id(DEPLOYMENT_ID)  # what `prefect deploy` does once it exists
    return triggers


def as_server_trigger(trigger):
    """What Prefect's trigger service evaluates (the server's schema has `covers`)."""
    from prefect.server.events.schemas.automations import EventTrigger

    return EventTrigger.model_validate(trigger.as_automation().trigger.model_dump())


def received(event: str, resource_id: str, name: str):
    from prefect.server.events.schemas.events import ReceivedEvent

    return ReceivedEvent(
        occurred=T0,
        event=event,
        resource={"prefect.resource.id": resource_id, "prefect.resource.name": name},
        id=uuid4(),
    )


def eject(state: SubjectState, at: datetime) -> list[dict]:
    """A failed probe of a quarantined subject, and the immune actions as the watchdog
    reports them."""
    _, actions = immune.observe(
        state, Observation(state.subject, at, "failure", "boom", task_id="probe"), P
    )
    return [
        {"subject": str(a.subject), "action": a.kind, "tier": int(a.tier), "detail": a.detail}
        for a in actions
    ]


def test_the_tuner_deployment_runs_on_the_recalibrate_event_with_its_subject_as_reason():
    [trigger] = tuner_triggers()
    assert trigger.enabled and trigger.expect == {anomaly.RECALIBRATE}
    assert trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.parameters == {"reason": "recalibrate: {{ event.resource.name }}"}
    [action] = trigger.as_automation().actions
    # Runs the tuner flow (which only ever starts canaries) with the event's subject.
    assert (action.type, action.deployment_id) == ("run-deployment", DEPLOYMENT_ID)
    assert action.parameters == trigger.parameters


def test_tier_3_emits_the_event_the_trigger_matches_and_tier_2_does_not():
    trigger = as_server_trigger(tuner_triggers()[0])
    mac = Subject.machine("mac3")
    third = eject(
        SubjectState(mac, tier=Tier.HARD, ejections=2, until=T0, probe_task="probe"),
        T0 + timedelta(seconds=5),
    )
    [recal] = anomaly.recalibrations(third)
    assert recal.subject == "machine:mac3" and recal.detail["reason"]
    assert trigger.covers(received(anomaly.RECALIBRATE, recal.resource_id, recal.subject))

    second = eject(
        SubjectState(mac, tier=Tier.HARD, ejections=1, until=T0, probe_task="probe"),
        T0 + timedelta(seconds=5),
    )
    assert [a["tier"] for a in second] == [int(Tier.HARD)]
    assert anomaly.recalibrations(second) == []
    # Other mesh events (the watchdog's alert, quarantine) do not run the tuner.
    for other in ("fleet.mesh.alert", "fleet.mesh.quarantine", "fleet.mesh.watchdog-run"):
        assert not trigger.covers(received(other, recal.resource_id, recal.subject))


def test_without_a_prefect_api_announcing_is_a_no_op(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    actions = [{"subject": "pane:mac1:%3", "action": "alert", "tier": 3, "detail": {}}]
    with temporary_settings({PREFECT_API_URL: None}):
        assert anomaly.announce(actions) == 0


@pytest.mark.parametrize("tier", [0, 1, 2])
def test_only_tier_3_alerts_are_recalibrations(tier):
    actions = [{"subject": "machine:m", "action": "alert", "tier": tier, "detail": {}}]
    assert anomaly.recalibrations(actions) == []
