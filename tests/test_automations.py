"""Fleet alerts: the automation definitions, the event helper, and — on the session's real
Prefect API — idempotent install and notifications that reach a local webhook."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet import automations, events
from fleet.automations_cli import app as automations_app
from fleet.errors import ConfigError

runner = CliRunner()


class Webhook:
    """A local HTTP server of the test's own that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                size = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(size) or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first notification whose subject or body mentions `text` (Prefect's trigger
        and action services deliver asynchronously)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in list(self.received):
                if text in body.get("subject", "") + body.get("body", ""):
                    return body
            time.sleep(0.2)
        raise AssertionError(
            f"no notification mentioning {text!r} within {timeout} s; got {self.received}"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Pure: definitions and the emit helper, no server ------------------------------------------


def test_five_alerts_with_distinct_names_each_a_valid_automation():
    from uuid import uuid4

    assert automations.ALERT_NAMES == (
        "fleet: app run failed",
        "fleet: cohort failed",
        "fleet: breaker opened",
        "fleet: task dead-lettered",
        "fleet: machine declared down",
    )
    notifier = uuid4()
    built = {a.name: automations.automation_for(a, notifier) for a in automations.ALERTS}
    app_failed = built["fleet: app run failed"].trigger
    assert app_failed.expect == {"prefect.flow-run.*"}
    assert app_failed.match_related.model_dump() == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "app-evolution",
    }
    assert (
        built["fleet: cohort failed"].trigger.match_related.model_dump()["prefect.resource.name"]
        == "fleet-cohort"
    )
    assert built["fleet: breaker opened"].trigger.expect == {"fleet.breaker.opened"}
    assert built["fleet: task dead-lettered"].trigger.expect == {"fleet.mesh.task.dead-lettered"}
    assert built["fleet: machine declared down"].trigger.expect == {"fleet.mesh.machine.down"}
    for automation in built.values():
        (action,) = automation.actions
        assert action.type == "send-notification" and action.block_document_id == notifier
        assert automation.tags == ["fleet"]


def test_emit_does_nothing_without_a_prefect_api():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert events.breaker_opened("gateway", failures=5) is False


def test_emit_never_raises(monkeypatch):
    import prefect.events
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("events worker exploded")

    monkeypatch.setattr(prefect.events, "emit_event", broken)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert events.machine_down("mac3", reason="no heartbeat") is False


@pytest.mark.parametrize("url", ["ftp://host/x", "not a url", "http://", ""])
def test_a_webhook_url_without_http_and_host_is_refused_in_one_line(url):
    with pytest.raises(ConfigError, match="is not an http\\(s\\) URL with a host"):
        automations.check_webhook_url(url)


def test_install_without_a_notifier_or_a_server_says_what_to_do(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    result = runner.invoke(automations_app, ["install"])
    assert result.exit_code == 2
    assert "give exactly one of --webhook-url" in result.output
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(automations_app, ["install", "--webhook-url", "http://x/hook"])
    assert result.exit_code == 2
    assert "automations live on a Prefect server: set PREFECT_API_URL" in result.output
    assert "Traceback" not in result.output


def test_an_unreachable_prefect_api_is_one_line():
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with temporary_settings(
        updates={PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}
    ):
        result = runner.invoke(automations_app, ["list"])
    assert result.exit_code == 2
    assert result.output.startswith("error: the Prefect API at http://127.0.0.1:9/api failed: ")
    assert "Traceback" not in result.output


# On the real Prefect API ------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def installed(prefect_harness, webhook) -> Iterator[None]:
    yield
    # The harness is shared by the session: leave no alerts behind for other tests' runs.
    asyncio.run(automations.uninstall())


def _by_name() -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for a in asyncio.run(automations.installed()):
        found.setdefault(a.name, []).append(a)
    return found


@pytest.mark.usefixtures("installed")
def test_install_twice_leaves_each_alert_once(webhook):
    first = runner.invoke(automations_app, ["install", "--webhook-url", webhook.url])
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == 5
    second = runner.invoke(automations_app, ["install", "--webhook-url", webhook.url])
    assert second.exit_code == 0, second.output
    assert second.output.count("unchanged") == 5
    found = _by_name()
    assert sorted(found) == sorted(automations.ALERT_NAMES)
    assert all(len(v) == 1 and v[0].enabled for v in found.values())
    listed = runner.invoke(automations_app, ["list"])
    assert listed.exit_code == 0 and "missing" not in listed.output
    assert "fleet.breaker.opened" in listed.output


@pytest.mark.usefixtures("installed")
def test_a_duplicate_and_a_drifted_alert_are_repaired(webhook):
    from prefect.client.orchestration import get_client

    notifier = asyncio.run(automations.webhook_notifier(webhook.url))
    asyncio.run(automations.install(notifier))
    breaker = automations.ALERTS[2]

    async def tamper() -> None:
        async with get_client() as client:
            await client.create_automation(automations.automation_for(breaker, notifier))
            (first, *_) = await client.read_automations_by_name(automations.ALERTS[3].name)
            drifted = automations.automation_for(automations.ALERTS[3], notifier)
            drifted.description = "edited in the UI"
            await client.update_automation(first.id, drifted)

    asyncio.run(tamper())
    outcomes = {i.name: i for i in asyncio.run(automations.install(notifier))}
    assert outcomes[breaker.name].duplicates_removed == 1
    assert outcomes[automations.ALERTS[3].name].outcome == "updated"
    assert all(len(v) == 1 for v in _by_name().values())


@pytest.mark.usefixtures("installed")
def test_a_named_notifier_must_exist_and_notify(webhook):
    asyncio.run(automations.webhook_notifier(webhook.url))
    assert asyncio.run(automations.named_notifier("custom-webhook/fleet-alerts"))
    with pytest.raises(ConfigError, match="does not exist on the Prefect server"):
        asyncio.run(automations.named_notifier("slack-webhook/nope"))
    with pytest.raises(ConfigError, match="expected <block-type-slug>/<name>"):
        asyncio.run(automations.named_notifier("fleet-alerts"))
    result = runner.invoke(automations_app, ["install", "--block", "slack-webhook/nope"])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.usefixtures("installed")
def test_emitted_fleet_events_reach_the_webhook(webhook):
    result = runner.invoke(automations_app, ["install", "--webhook-url", webhook.url])
    assert result.exit_code == 0, result.output
    assert events.breaker_opened("gateway-mac1", failures=5, reason="connect timeout")
    assert events.task_dead_lettered("t-42", attempts=4, reason="stuck", machine_id="mac2")
    assert events.machine_down("mac3", reason="3 failed confirmations", requeued=2)

    breaker = webhook.wait_for("gateway-mac1")
    assert breaker["subject"] == "[fleet] breaker opened: gateway-mac1"
    assert breaker["body"] == ("Breaker gateway-mac1 opened after 5 failures: connect timeout")
    assert webhook.wait_for("t-42")["body"] == (
        "Mesh task t-42 was dead-lettered after 4 attempts: stuck"
    )
    assert webhook.wait_for("mac3")["body"] == (
        "Machine mac3 was declared down (3 failed confirmations); 2 tasks requeued."
    )


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("flow_name", "what", "other"),
    [
        ("app-evolution", "app", "cohort"),
        ("fleet-cohort", "cohort", "app"),
    ],
)
def test_a_failed_run_reaches_the_webhook(webhook, flow_name, what, other):
    from prefect import flow

    result = runner.invoke(automations_app, ["install", "--webhook-url", webhook.url])
    assert result.exit_code == 0, result.output
    run_name = f"{what}-alert-probe"

    @flow(name=flow_name, flow_run_name=run_name, persist_result=False)
    def probe() -> None:
        raise RuntimeError("insufficient_tasks: 1 task parsed, 3 needed")

    state = probe(return_state=True)
    assert state.is_failed()
    alert = webhook.wait_for(run_name)
    assert alert["subject"] == f"[fleet] {what} failed: {run_name}"
    assert "insufficient_tasks" in alert["body"]
    # Each flow's alert matches its own flow's runs only.
    assert not [
        b for b in webhook.received if b["subject"] == f"[fleet] {other} failed: {run_name}"
    ]
