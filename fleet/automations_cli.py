"""`fleet automations`: install the Prefect automations that alert an operator, and list them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleet.errors import ConfigError, FleetError

app = typer.Typer(
    help="Prefect automations: alerts on failed runs, open breakers, dead letters, machines down.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _fail(exc: Exception, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)


def _on_server(call: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `call` against the configured Prefect server; an unreachable or refusing server
    is one line, not a traceback."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "automations live on a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api) and run this again"
        )
    try:
        return asyncio.run(call())
    except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FleetError(
            f"the Prefect API at {url} failed: {cause} — is `prefect server start` running there?"
        ) from None


@app.command("install")
def install(
    webhook_url: str | None = typer.Option(
        None,
        "--webhook-url",
        envvar="FLEET_ALERT_WEBHOOK_URL",
        help="notify by POSTing JSON {subject, body} here (saved as the Custom Webhook block "
        "'fleet-alerts')",
    ),
    block: str | None = typer.Option(
        None,
        "--block",
        envvar="FLEET_ALERT_BLOCK",
        help="notify through an existing notification block instead, as <type-slug>/<name> "
        "(e.g. slack-webhook/ops-alerts)",
    ),
) -> None:
    """Create the five alerts (or bring them up to date); running it again changes nothing."""
    from fleet import automations

    try:
        if bool(webhook_url) == bool(block):
            raise ConfigError(
                "give exactly one of --webhook-url (or FLEET_ALERT_WEBHOOK_URL) "
                "and --block (or FLEET_ALERT_BLOCK)"
            )

        async def run() -> list[automations.Installed]:
            notifier = await (
                automations.named_notifier(block)
                if block
                else automations.webhook_notifier(webhook_url or "")
            )
            return await automations.install(notifier)

        done = _on_server(run)
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
        found = _on_server(automations.installed)
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
