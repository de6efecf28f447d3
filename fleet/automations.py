"""The Prefect automations that alert an operator, defined once and installed by name."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

from fleet import events
from fleet.errors import ConfigError

if TYPE_CHECKING:
    from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger

APP_FLOW = "app-evolution"
COHORT_FLOW = "fleet-cohort"
# State *types*, not names: a cohort may end in a named state of type FAILED and still alert.
FAILED_STATE_TYPES = ["FAILED", "CRASHED"]
NOTIFIER_BLOCK_NAME = "fleet-alerts"  # the webhook notification block `install --webhook-url` saves
TAG = "fleet"

Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class Alert:
    """One alert: what fires it and what the notification says (Jinja, rendered by Prefect)."""

    name: str
    description: str
    expect: str
    match: dict[str, str | list[str]]
    match_related: dict[str, str | list[str]]
    subject: str
    body: str


def _flow_failed(name: str, flow: str, what: str) -> Alert:
    return Alert(
        name=name,
        description=f"A {what} run (flow `{flow}`) ended Failed or Crashed.",
        expect="prefect.flow-run.*",
        match={
            "prefect.resource.id": "prefect.flow-run.*",
            "prefect.state-type": FAILED_STATE_TYPES,
        },
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": flow},
        subject=f"[fleet] {what} failed: {{{{ flow_run.name }}}}",
        body=(
            f"{what.capitalize()} run {{{{ flow_run.name }}}} of flow {flow} ended "
            "{{ flow_run.state.name }}: {{ flow_run.state.message }}"
        ),
    )


def _fleet_event(name: str, event: str, resource_prefix: str, description: str, body: str) -> Alert:
    return Alert(
        name=name,
        description=description,
        expect=event,
        match={"prefect.resource.id": resource_prefix + "*"},
        match_related={},
        subject=f"[fleet] {name.removeprefix('fleet: ')}: {{{{ event.resource.name }}}}",
        body=body,
    )


ALERTS: tuple[Alert, ...] = (
    _flow_failed("fleet: app run failed", APP_FLOW, "app"),
    _flow_failed("fleet: cohort failed", COHORT_FLOW, "cohort"),
    _fleet_event(
        "fleet: breaker opened",
        events.BREAKER_OPENED,
        events.BREAKER_RESOURCE,
        "A circuit breaker opened: calls through it fail fast until it half-opens.",
        "Breaker {{ event.resource.name }} opened after {{ event.payload.failures }} failures: "
        "{{ event.payload.reason }}",
    ),
    _fleet_event(
        "fleet: task dead-lettered",
        events.TASK_DEAD_LETTERED,
        events.TASK_RESOURCE,
        "A mesh task failed more attempts than allowed and will not run again by itself.",
        "Mesh task {{ event.resource.name }} was dead-lettered after "
        "{{ event.payload.attempts }} attempts: {{ event.payload.reason }}",
    ),
    _fleet_event(
        "fleet: machine declared down",
        events.MACHINE_DOWN,
        events.MACHINE_RESOURCE,
        "The mesh declared a machine down; its claimed tasks went back to the queue.",
        "Machine {{ event.resource.name }} was declared down ({{ event.payload.reason }}); "
        "{{ event.payload.requeued }} tasks requeued.",
    ),
)
ALERT_NAMES = tuple(a.name for a in ALERTS)


def trigger_for(alert: Alert) -> EventTrigger:
    from prefect.events.schemas.automations import EventTrigger, Posture

    # Every field set explicitly: the client's update sends only fields that were set.
    return EventTrigger(
        expect={alert.expect},
        match=alert.match,
        match_related=alert.match_related,
        for_each={"prefect.resource.id"},  # one alert per run, breaker, task or machine
        after=set(),
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def automation_for(alert: Alert, notifier: UUID) -> AutomationCore:
    """The automation of `alert`, notifying through the notification block `notifier`."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore(
        name=alert.name,
        description=alert.description,
        enabled=True,
        tags=[TAG],
        trigger=trigger_for(alert),
        actions=[
            SendNotification(block_document_id=notifier, subject=alert.subject, body=alert.body)
        ],
        actions_on_trigger=[],
        actions_on_resolve=[],
    )


@dataclass(frozen=True)
class Installed:
    name: str
    id: UUID
    outcome: Outcome
    duplicates_removed: int = 0


async def install(notifier: UUID) -> list[Installed]:
    """Create each alert's automation, or bring the one of that name up to date; extra
    automations of the same name (two installs at once) are deleted. Running it again
    changes nothing."""
    from prefect.client.orchestration import get_client

    done: list[Installed] = []
    async with get_client() as client:
        for alert in ALERTS:
            wanted = automation_for(alert, notifier)
            found = await client.read_automations_by_name(alert.name)
            if not found:
                created = await client.create_automation(wanted)
                done.append(Installed(alert.name, created, "created"))
                continue
            keep, *extra = sorted(found, key=lambda a: str(a.id))
            for duplicate in extra:
                await client.delete_automation(duplicate.id)
            outcome: Outcome = "unchanged"
            if _comparable(keep) != _comparable(wanted):
                await client.update_automation(keep.id, wanted)
                outcome = "updated"
            done.append(Installed(alert.name, keep.id, outcome, len(extra)))
    return done


async def installed() -> list[Automation]:
    """The fleet's automations present on the Prefect server, in ALERTS order."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        found = [a for name in ALERT_NAMES for a in await client.read_automations_by_name(name)]
    return found


async def uninstall() -> int:
    """Delete the fleet's automations; returns how many were deleted."""
    from prefect.client.orchestration import get_client

    gone = 0
    async with get_client() as client:
        for name in ALERT_NAMES:
            for automation in await client.read_automations_by_name(name):
                await client.delete_automation(automation.id)
                gone += 1
    return gone


async def webhook_notifier(url: str, block_name: str = NOTIFIER_BLOCK_NAME) -> UUID:
    """Save (or overwrite) a webhook notification block posting JSON to `url`; its id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    check_webhook_url(url)
    block = CustomWebhookNotificationBlock(
        name=block_name,
        url=url,
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "{{name}}"},
        headers=None,
        cookies=None,
    )
    return await block.save(block_name, overwrite=True)


async def named_notifier(slug: str) -> UUID:
    """The id of an existing notification block `<block-type-slug>/<name>` (e.g. a Slack
    webhook made in the UI), refused in one line if it is missing or cannot notify."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    type_slug, _, name = slug.partition("/")
    if not type_slug or not name:
        raise ConfigError(
            f"notification block {slug!r}: expected <block-type-slug>/<name>, "
            "e.g. slack-webhook/ops-alerts"
        )
    async with get_client() as client:
        try:
            document = await client.read_block_document_by_name(
                name, type_slug, include_secrets=False
            )
        except ObjectNotFound:
            raise ConfigError(
                f"notification block {slug!r} does not exist on the Prefect "
                "server — create it in the UI (Blocks) or with `prefect block`"
            ) from None
    if document.block_schema is None or "notify" not in document.block_schema.capabilities:
        raise ConfigError(
            f"block {slug!r} cannot send notifications — use a notification "
            "block (Slack, Teams, Custom Webhook, email…)"
        )
    assert document.id is not None  # a stored document always has one
    return document.id


def check_webhook_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook URL {url!r} is not an http(s) URL with a host")


def _comparable(automation: Any) -> dict[str, Any]:
    """What an install controls, without ids the server assigns."""
    data = automation.model_dump(
        mode="json",
        include={
            "name",
            "description",
            "enabled",
            "tags",
            "trigger",
            "actions",
            "actions_on_trigger",
            "actions_on_resolve",
        },
    )
    data["trigger"].pop("id", None)
    return data
