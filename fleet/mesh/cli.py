"""`fleet agent`: start a node agent on this machine, or show a running agent's health."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
from datetime import UTC
from pathlib import Path

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from fleet.clients.transport import is_loopback
from fleet.errors import ConfigError, FleetError
from fleet.mesh.open import open_mesh_store
from fleet.mesh.store import PROTOCOL_GENERATION

agent_app = typer.Typer(
    help="The node agent: heartbeat, claim mesh work, run it in tmux panes.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)

ROLES = ("worker", "planner", "viewer")


def _fail(message: object, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@agent_app.command("start")
def start(
    machine_id: str = typer.Option(..., "--machine-id", help="this machine's id, e.g. mac3"),
    mesh_id: str = typer.Option(
        ..., "--mesh-id", help="the mesh this machine belongs to, e.g. prod"
    ),
    role: str = typer.Option(
        "worker", "--role", help="worker | planner | viewer (viewers never claim)"
    ),
    agent_command: str = typer.Option(
        "claude",
        "--agent-command",
        help="the agent run in each pane, as shell-style words (no shell runs it)",
    ),
    store_url: str = typer.Option(
        "", "--store-url", help="mesh store; default FLEET_STORE_URL or <home>/fleet.db"
    ),
    health_port: int | None = typer.Option(
        None, "--health-port", help="default FLEET_AGENT_HEALTH_PORT (9300)"
    ),
    health_host: str = typer.Option(
        "0.0.0.0",
        "--health-host",
        help="address the health endpoint binds (all interfaces by default)",
    ),
    advertise_host: str | None = typer.Option(
        None,
        "--advertise-host",
        help="host name or address other machines reach this agent at (the watchdog probes it); "
        "default FLEET_AGENT_ADVERTISE_HOST, else this machine's FQDN when binding all interfaces",
    ),
    tmux_socket: str = typer.Option("fleet", "--tmux-socket", help="tmux socket name (tmux -L)"),
    panes: int | None = typer.Option(
        None, "--panes", help="panes (parallel tasks); default FLEET_AGENT_PANES"
    ),
    state_path: Path | None = typer.Option(
        None, "--state-path", help="default <home>/agent-<machine>.json"
    ),
    expect_mesh: str | None = typer.Option(
        None,
        "--expect-mesh",
        help="refuse to start unless --mesh-id is this (default FLEET_MESH_ID)",
    ),
    generation: int = typer.Option(
        PROTOCOL_GENERATION, "--generation", help="protocol generation spoken"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the node agent until SIGTERM/SIGINT, then leave the mesh (claims are requeued)."""
    import libtmux

    from fleet.clock import SystemClock
    from fleet.mesh.agent import NodeAgent
    from fleet.mesh.store import MachineIdentity
    from fleet.mesh.tmux import PaneControl
    from fleet.settings import get_settings

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if role not in ROLES:
        _fail(f"--role {role!r} is not one of {', '.join(ROLES)}")
    try:
        argv = shlex.split(agent_command)
    except ValueError as exc:
        _fail(f"--agent-command {agent_command!r} cannot be split into words: {exc}")
    if not argv and role != "viewer":
        _fail('--agent-command is empty — give the agent to run in the panes, e.g. "claude"')
    if panes is not None and panes < 1:
        _fail(f"--panes must be at least 1, got {panes}")
    if health_port is not None and not 0 <= health_port <= 65535:
        _fail(f"--health-port {health_port} is not a TCP port (0–65535)")
    try:
        # Validated from a dict: `role` is checked against the allowed roles here, not typed.
        identity = MachineIdentity.model_validate(
            {"machine_id": machine_id, "mesh_id": mesh_id, "role": role, "generation": generation}
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        _fail(
            f"invalid machine identity — {problems} (machine ids are letters, digits, . _ -; ≤ 64)"
        )

    settings = get_settings()
    try:
        store = open_mesh_store(store_url or settings.resolved_store_url())
        agent = NodeAgent(
            identity,
            store,
            PaneControl(
                libtmux.Server(socket_name=tmux_socket), chunk_bytes=settings.tmux_chunk_bytes
            ),
            clock=SystemClock(),
            settings=settings,
            agent_command=argv,
            state_path=state_path or settings.home / f"agent-{machine_id}.json",
            expected_mesh_id=expect_mesh,
            pane_count=panes,
            health_port=settings.agent_health_port if health_port is None else health_port,
            health_host=health_host,
            advertise_host=advertise_host,
        )
        from fleet.clients.breaker import share_states

        share_states(store)  # this process's breakers, seen by the watchdog
        # Before start(): a SIGTERM while starting still leaves cleanly.
        agent.install_signal_handlers()
        agent.start()
    except ConfigError as exc:
        _fail(exc)
    except FleetError as exc:  # store or tmux unreachable: not bad input, but no traceback either
        _fail(exc, 1)
    if agent.health_url and is_loopback(httpx.URL(agent.health_url).host):
        err.print(
            f"[yellow]warning:[/] the health URL {agent.health_url} is loopback: a watchdog on "
            "another machine cannot reach it, so it can never confirm this machine down — "
            "give --advertise-host (or bind --health-host 0.0.0.0)",
            soft_wrap=True,
        )
    console.print(
        f"[green]node agent {machine_id}[/] ({role}, mesh {mesh_id}) running; "
        f"health at {agent.health_url} ; Ctrl-C leaves the mesh",
        soft_wrap=True,
    )
    agent.run_forever()


@agent_app.command("status")
def status(
    url: str = typer.Option("http://127.0.0.1:9300", "--url", help="the agent's health endpoint"),
    as_json: bool = typer.Option(False, "--json", help="print the raw JSON"),
    timeout: float = typer.Option(5.0, "--timeout"),
) -> None:
    """Show a running node agent's health (FLEET_AGENT_HEALTH_TOKEN is sent when set)."""
    from fleet.settings import get_settings

    secret = get_settings().agent_health_token
    headers = {"Authorization": f"Bearer {secret.get_secret_value()}"} if secret else {}
    target = url.rstrip("/")
    if not target.startswith(("http://", "https://")):
        _fail(f"--url {url!r} must start with http:// or https://")
    if not target.endswith("/health"):
        target += "/health"
    try:
        response = httpx.get(target, timeout=timeout, headers=headers)
        body = response.json()
    except httpx.HTTPError as exc:
        _fail(
            f"no node agent answered at {target}: {exc} — is `fleet agent start` running there?", 1
        )
    except ValueError:
        _fail(f"{target} did not answer with JSON — is that a node agent's health port?", 1)
    if response.status_code != 200:
        _fail(f"{target} answered {response.status_code}: {body.get('error', body)}", 1)
    if as_json:
        console.print_json(json.dumps(body))
        return
    ident = body.get("identity", {})
    style = {"ok": "green", "degraded": "yellow"}.get(body.get("status"), "red")
    console.print(
        f"[bold]{ident.get('machine_id')}[/] · mesh {ident.get('mesh_id')} · "
        f"role {ident.get('role')} · "
        f"gen {ident.get('generation')} · [{style}]{body.get('status')}[/] · "
        f"last heartbeat {body.get('last_heartbeat') or '—'}"
    )
    tasks = Table(title="active tasks")
    for col in ("task", "status", "pane"):
        tasks.add_column(col)
    for task in body.get("active_tasks", []):
        tasks.add_row(task.get("task_id"), task.get("status"), task.get("pane_id") or "—")
    panes = Table(title="panes")
    for col in ("pane", "alive", "task", "context"):
        panes.add_column(col)
    for pane in body.get("panes", []):
        ratio = pane.get("context_ratio")
        panes.add_row(
            pane.get("pane_id"),
            "[green]yes[/]" if pane.get("alive") else "[red]no[/]",
            pane.get("task_id") or "—",
            f"{ratio:.0%}" if ratio is not None else "—",
        )
    console.print(tasks)
    console.print(panes)


@agent_app.command("mesh")
def mesh(
    store_url: str = typer.Option(
        "", "--store-url", help="mesh store; default FLEET_STORE_URL or <home>/fleet.db"
    ),
) -> None:
    """Show every machine and the task queue, as the mesh store has them."""
    from datetime import datetime

    from fleet.settings import get_settings

    settings = get_settings()
    try:
        store = open_mesh_store(store_url or settings.resolved_store_url())
        try:
            now = datetime.now(UTC)
            machines, stats = store.machines(), store.queue_stats(now)
            quarantined = [
                s for s in store.immune_states() if s.quarantined(now) or s.backing_off(now)
            ]
        finally:
            store.close()
    except ConfigError as exc:
        _fail(exc)
    except FleetError as exc:
        _fail(exc, 1)
    table = Table(title="machines")
    for col in ("machine", "role", "status", "last heartbeat", "active tasks", "health"):
        table.add_column(col)
    for m in machines:
        age = (now - m.last_heartbeat).total_seconds()
        style = {"alive": "green", "suspect": "yellow"}.get(m.status, "red")
        table.add_row(
            m.machine_id,
            m.role,
            f"[{style}]{m.status}[/]",
            f"{age:.0f} s ago",
            str(len(m.active_tasks)),
            m.health_url or "—",
        )
    console.print(table)
    depth = " · ".join(f"{status} {n}" for status, n in stats["depth"].items())
    oldest = stats["oldest_queued_age_seconds"]
    console.print(f"queue: {depth}", soft_wrap=True)
    console.print("oldest queued " + (f"{oldest / 60:.0f} min ago" if oldest is not None else "—"))
    if quarantined:
        console.print(_quarantine_table(quarantined, now))


def _quarantine_table(states, now) -> Table:
    from fleet.mesh.immune import ImmunePolicy
    from fleet.settings import get_settings

    policy = ImmunePolicy.from_settings(get_settings())
    table = Table(title="quarantines")
    for col in ("subject", "tier", "weight", "until", "probe", "ejections", "reason"):
        table.add_column(col)
    for s in states:
        until = s.until if s.tier else s.backoff_until
        left = f"{(until - now).total_seconds():.0f} s" if until and until > now else "due"
        table.add_row(
            str(s.subject),
            str(int(s.tier)),
            f"{s.weight(now, policy):.2f}",
            left,
            s.probe_task or "—",
            str(s.ejections),
            s.reason or "—",
        )
    return table


mesh_app = typer.Typer(
    help="The mesh as a whole: quarantines of the immune system.", no_args_is_help=True
)
quarantine_app = typer.Typer(
    help="Subjects (machines, panes, task types, accounts) in quarantine.", no_args_is_help=True
)
mesh_app.add_typer(quarantine_app, name="quarantine")


def _open(store_url: str):
    from fleet.settings import get_settings

    try:
        return open_mesh_store(store_url or get_settings().resolved_store_url())
    except ConfigError as exc:
        _fail(exc)
    except FleetError as exc:
        _fail(exc, 1)


@quarantine_app.command("list")
def quarantine_list(
    store_url: str = typer.Option(
        "", "--store-url", help="mesh store; default FLEET_STORE_URL or <home>/fleet.db"
    ),
    show_all: bool = typer.Option(
        False, "--all", help="also subjects with failures but no quarantine"
    ),
) -> None:
    """Every subject in quarantine (or backing off), with its tier, weight and end."""
    from datetime import datetime

    store = _open(store_url)
    try:
        now = datetime.now(UTC)
        states = [
            s for s in store.immune_states() if show_all or s.quarantined(now) or s.backing_off(now)
        ]
    except FleetError as exc:
        _fail(exc, 1)
    finally:
        store.close()
    if not states:
        console.print("no quarantines")
        return
    console.print(_quarantine_table(states, now))


@quarantine_app.command("lift")
def quarantine_lift(
    subject: str = typer.Argument(
        ..., help="kind:key, e.g. machine:mac3, pane:mac3/%2, account:claude-a"
    ),
    store_url: str = typer.Option(
        "", "--store-url", help="mesh store; default FLEET_STORE_URL or <home>/fleet.db"
    ),
) -> None:
    """Release a subject now (its failures are forgotten; the claim gives it work again)."""
    import getpass
    from datetime import datetime

    from fleet.mesh.immune import Subject

    try:
        parsed = Subject.parse(subject)
    except ValueError as exc:
        _fail(exc)
    store = _open(store_url)
    try:
        lifted = store.lift(parsed, datetime.now(UTC), by=getpass.getuser())
    except FleetError as exc:
        _fail(exc, 1)
    finally:
        store.close()
    if not lifted:
        _fail(f"{parsed} is not in quarantine — see `fleet mesh quarantine list`", 1)
    console.print(f"[green]lifted[/] {parsed}")


if __name__ == "__main__":
    agent_app()


chaos_app = typer.Typer(
    help="Inject a fault into the running local system; reverted when its time is up.",
    no_args_is_help=True,
)
metrics_app = typer.Typer(help="Prometheus metrics of the mesh.", no_args_is_help=True)


@chaos_app.command("inject")
def chaos_inject(
    kind: str = typer.Argument(
        ...,
        help="kill-pane | kill-agent | drop-machine | gateway-errors | store-outage | cpu-spike",
    ),
    duration: str = typer.Option("60s", "--for", help="how long the fault lasts (60s, 5m)"),
    target: str = typer.Option(
        "",
        "--target",
        help="pane id (kill-pane), agent pid (kill-agent, drop-machine), cores (cpu-spike)",
    ),
    store_url: str = typer.Option("", "--store-url", help="store-outage: default FLEET_STORE_URL"),
    gateway_url: str = typer.Option(
        "", "--gateway-url", help="gateway-errors: default FLEET_AURA_URL"
    ),
    tmux_socket: str = typer.Option("fleet", "--tmux-socket"),
) -> None:
    """Start a fault, keep it for --for, revert it (Ctrl-C reverts at once)."""
    import time

    from fleet.mesh import chaos
    from fleet.settings import get_settings

    settings = get_settings()
    try:
        seconds = chaos.parse_duration(duration)
        fault = chaos.inject(
            kind,
            target=target,
            store_url=store_url or settings.resolved_store_url(),
            gateway_url=gateway_url or settings.aura_url,
            tmux_socket=tmux_socket,
        )
    except ConfigError as exc:
        _fail(exc)
    except Exception as exc:  # the system to break is not there: say so, no traceback
        _fail(f"{kind} could not start: {type(exc).__name__}: {exc}", 1)
    console.print(f"[yellow]{kind}[/] on {fault.target} for {seconds:g} s …")
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        chaos.run(fault, seconds)
    console.print(f"[green]reverted[/] {kind} after {time.monotonic() - started:.1f} s")


@metrics_app.command("pull")
def metrics_pull(
    since: str = typer.Option("5m", "--since", help="window of the event-based figures (5m, 1h)"),
    url: list[str] = typer.Option(
        [],
        "--url",
        help="a /metrics endpoint to read (repeatable); default: computed from the mesh store",
    ),
    store_url: str = typer.Option("", "--store-url", help="mesh store; default FLEET_STORE_URL"),
) -> None:
    """Fetch Prometheus metrics and print them as a table."""
    from datetime import datetime, timedelta

    from fleet import metrics
    from fleet.mesh.chaos import parse_duration

    try:
        window = timedelta(seconds=parse_duration(since))
    except ConfigError as exc:
        _fail(exc)
    texts: list[tuple[str, str]] = []
    for u in url:
        try:
            response = httpx.get(u, timeout=5)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            _fail(f"no metrics at {u}: {exc}", 1)
        texts.append((u, response.text))
    if not url:
        store = _open(store_url)
        try:
            reg = metrics.mesh_metrics(store, datetime.now(UTC), since=window)
            texts.append(("store", metrics.render(reg).decode()))
        except FleetError as exc:
            _fail(exc, 1)
        finally:
            store.close()
    table = Table(title=f"metrics (events of the last {since})")
    for col in ("source", "metric", "labels", "value"):
        table.add_column(col)
    for source, text in texts:
        for name, labels, value in metrics.samples(text):
            if name.endswith(("_created", "_bucket")):
                continue
            shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
            table.add_row(source, name, shown or "—", f"{value:g}")
    console.print(table)
