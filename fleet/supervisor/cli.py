"""`fleet supervise`: guard one agent command, run the process manager, check a config file."""

from __future__ import annotations

import shlex
import signal
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleet.errors import ConfigError, FleetError
from fleet.settings import get_settings

supervise_app = typer.Typer(
    name="supervise",
    help="The immutable supervisor: guarded agent changes, supervised helper processes.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@supervise_app.command(context_settings={"allow_interspersed_args": False})
def guard(
    agent_command: list[str] = typer.Argument(
        ..., metavar="AGENT_CMD", help="the agent command (argv), after --"
    ),
    repo: Path = typer.Option(Path("."), "--repo", help="the app repository the agent edits"),
    protect: list[str] = typer.Option(
        [], "--protect", help="glob of paths the agent may not change (repeatable)"
    ),
    check: str | None = typer.Option(
        None, "--check", help='check command run after the agent, e.g. "pytest -q"'
    ),
    check_timeout: float = typer.Option(
        600, "--check-timeout", help="seconds before the check is stopped"
    ),
    agent_timeout: float | None = typer.Option(
        None, "--agent-timeout", help="seconds before the agent is stopped"
    ),
    patches_dir: Path | None = typer.Option(
        None, "--patches-dir", help="where rejected diffs are kept"
    ),
) -> None:
    """Snapshot REPO, run AGENT_CMD, keep its change if it is safe and passes the check; else undo
    it.

    Exit 0 = accepted (and committed), 1 = rejected (rolled back, patch kept), 2 = could not guard.
    """
    from fleet.supervisor.guard import ChangeGuard
    from fleet.supervisor.runner import run_agent

    try:
        check_argv = shlex.split(check) if check else None
        change_guard = ChangeGuard(repo, protect, check_argv, patches_dir, check_timeout)
        snap = change_guard.snapshot()
        code, tail = run_agent(list(agent_command), change_guard.repo, agent_timeout, None)
        verdict = change_guard.validate(snap)
    except (FleetError, ValueError) as exc:  # shlex: unbalanced quotes
        err.print(f"[red]cannot guard:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    agent = "stopped at the timeout" if code is None else f"exit {code}"
    out.print(f"agent: {escape(agent)}" + (f" — {escape(tail)}" if tail else ""))
    if verdict.accepted:
        note = "" if verdict.reason == "accepted" else f" ({escape(verdict.reason)})"
        out.print(f"[green]accepted[/green]: HEAD {verdict.head[:12]}{note}")
        raise typer.Exit(0)
    out.print(f"[red]rejected[/red]: {escape(verdict.reason)}")
    for violation in verdict.violations:
        out.print(f"  - {escape(violation)}")
    out.print(
        f"rolled back to {verdict.head[:12]}; patch kept at {escape(str(verdict.patch_path))}"
    )
    raise typer.Exit(1)


@supervise_app.command("check-config")
def check_config(file: Path = typer.Argument(..., help="the supervisor.yaml to validate")) -> None:
    """Validate a supervisor config: prints OK, or each error as file:line: key: what was
    expected."""
    from fleet.supervisor.config import load_config

    try:
        config = load_config(file)
    except ConfigError as exc:
        err.print(escape(str(exc)))
        raise typer.Exit(2) from None
    app = "; app " + str(config.app.repo) if config.app else ""
    out.print(f"OK {escape(str(file))}: {len(config.processes)} process(es){escape(app)}")


@supervise_app.command()
def run(
    config_path: Path = typer.Option(..., "--config", help="supervisor.yaml"),
    port: int | None = typer.Option(
        None, "--port", help="status port (overrides the config; 0 = any free)"
    ),
    duration: float = typer.Option(
        0, "--for", help="stop cleanly after this many seconds (0 = until Ctrl-C)"
    ),
    interval: float = typer.Option(0.5, "--interval", help="seconds between supervision rounds"),
) -> None:
    """Run the configured processes (and app) with the status endpoint until Ctrl-C, then stop
    them all."""
    from fleet.supervisor.config import load_config
    from fleet.supervisor.procman import ProcessManager
    from fleet.supervisor.runner import Supervisor
    from fleet.supervisor.status import StatusServer

    settings = get_settings()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        err.print(escape(str(exc)))
        raise typer.Exit(2) from None

    stop = threading.Event()
    log_dir = settings.home.resolve() / "supervisor" / "logs"
    manager = ProcessManager(
        config.processes,
        log_dir=log_dir,
        on_event=lambda name, what: out.print(f"{escape(name)}: {escape(what)}"),
    )
    supervisor = None
    app_thread = None
    try:
        if config.app:
            a = config.app
            # The config file itself is always protected, wherever it lives in the repo.
            protected = [*a.protected, *_relative_to(config_path, a.repo)]
            supervisor = Supervisor(
                a.repo,
                a.command,
                protected,
                a.check_command,
                min_runtime=a.min_runtime_seconds,
                max_failures=a.max_failures,
                log_path=log_dir / "app.log",
                keep_commits=a.keep_commits,
                health=a.health,
            )
        status_port = port if port is not None else config.status_port
        server = StatusServer(
            supervisor,
            manager,
            host=config.status_host,
            port=status_port,
            metrics=_mesh_metrics(),
        )
        server.start()  # binds here, so a taken port is the one-line error below
    except (FleetError, OSError) as exc:
        err.print(f"[red]cannot start the supervisor:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None

    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = time.monotonic() + duration if duration > 0 else None
    with server:
        out.print(f"status: {server.url}/status  health: {server.url}/healthz")
        if supervisor is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            app_thread = threading.Thread(
                target=_supervise_app, args=(supervisor, stop), daemon=True
            )
            app_thread.start()
        try:
            manager.run_forever(
                interval=interval,
                until=lambda: (
                    stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                ),
            )
        except KeyboardInterrupt:
            manager.stop_all()
        finally:
            stop.set()
            if app_thread is not None:
                app_thread.join(timeout=30)
            signal.signal(signal.SIGTERM, previous)
    _print_summary(manager.status())


def _supervise_app(supervisor, stop: threading.Event) -> None:
    try:
        supervisor.run(until=stop.is_set)
    except FleetError as exc:  # e.g. the repo became unrestorable: say so, keep the helpers running
        err.print(f"[red]app supervision stopped:[/red] {escape(str(exc))}")
    if supervisor.state == "emergency_stop":
        err.print(f"[red]{escape(supervisor.reason)}[/red]")


def _relative_to(config_path: Path, repo: Path) -> list[str]:
    try:
        return [str(config_path.resolve().relative_to(repo.resolve()))]
    except ValueError:
        return []


def _print_summary(status: dict) -> None:
    table = Table(title="stopped", title_justify="left")
    for column in ("process", "state", "restarts", "reason"):
        table.add_column(column)
    for name, proc in status.items():
        table.add_row(escape(name), proc["state"], str(proc["restarts"]), escape(proc["reason"]))
    out.print(table)


def _mesh_metrics():
    """The mesh's figures for GET /metrics beside the supervisor's, read from the store the
    mesh uses (FLEET_STORE_URL, or the local SQLite file) at each scrape."""
    from fleet.clock import utcnow
    from fleet.mesh.open import open_mesh_store
    from fleet.metrics import metrics_endpoint

    url = get_settings().resolved_store_url()
    return metrics_endpoint(lambda: open_mesh_store(url), utcnow)
