"""`fleet automations`: install the Prefect automations that alert an operator, and list them."""

from __future__ import annotations

import asyncio
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleet.errors import ConfigError, FleetError

app = typer.Typer(help="Prefect automations: alerts on failed runs, open breakers, dead letters, "
                       "machines down.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _fail(exc: Exception, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)


def _require_server() -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError("automations live on a Prefect server: set PREFECT_API_URL "
                          "(e.g. http://127.0.0.1:4200/api) and run this again")


@app.command("install")
def install(
    webhook_url: Optional[str] = typer.Option(
        None, "--webhook-url", envvar="FLEET_ALERT_WEBHOOK_URL",
        help="notify by POSTing JSON {subject, body} here (saved as the Custom Webhook block "
             "'fleet-alerts')"),
    block: Optional[str] = typer.Option(
        None, "--block", envvar="FLEET_ALERT_BLOCK",
        help="notify through an existing notification block instead, as <type-slug>/<name> "
             "(e.g. slack-webhook/ops-alerts)"),
) -> None:
    """Create the five alerts (or bring them up to date); running it again changes nothing."""
    from fleet import automations

    try:
        if bool(webhook_url) == bool(block):
            raise ConfigError("give exactly one of --webhook-url (or FLEET_ALERT_WEBHOOK_URL) "
                              "and --block (or FLEET_ALERT_BLOCK)")
        _require_server()

        async def run() -> list[automations.Installed]:
            notifier = await (automations.named_notifier(block) if block
                              else automations.webhook_notifier(webhook_url or ""))
            return await automations.install(notifier)

        done = asyncio.run(run())
    except FleetError as exc:
        _fail(exc)
    for item in done:
        removed = item.duplicates_removed
        extra = f" ({removed} duplicates removed)" if removed else ""
        console.print(f"{item.outcome:<9} {item.name}{extra}")


@app.command("list")
def list_automations() -> None:
    """Show the fleet's automations on the Prefect server and whether each is enabled."""
    from fleet import automations

    try:
        _require_server()
        found = asyncio.run(automations.installed())
    except FleetError as exc:
        _fail(exc)
    present = {a.name for a in found}
    table = Table("automation", "enabled", "trigger")
    for a in found:
        expect = ", ".join(sorted(getattr(a.trigger, "expect", ())))
        table.add_row(a.name, "yes" if a.enabled else "no", expect)
    for name in automations.ALERT_NAMES:
        if name not in present:
            table.add_row(name, "missing", "run `fleet automations install`")
    console.print(table)
