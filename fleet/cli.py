"""The `fleet` command: run cohorts (demo or real fleet), inspect state, check config."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fleet.errors import FleetError
from fleet.report import STAGE_STYLE, result_table
from fleet.settings import get_settings

app = typer.Typer(
    help="Fleet Evolution Engine: evolve a fleet of apps with AI agents.", no_args_is_help=True
)
config_app = typer.Typer(help="Live fleet config kept in the store (what the cohort flow reads).")
app.add_typer(config_app, name="config")
console = Console()
err = Console(stderr=True)


def _fail(exc: Exception, code: int = 2) -> None:
    # escape(): messages quote rules like [a-z0-9._-] that rich would take for markup.
    err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)


def _prepare_prefect(verbose: bool) -> None:
    """Quiet, isolated Prefect for a terminal run; must happen before Prefect is imported.

    Only the console handler is quieted: the runs' loggers stay at INFO, so the UI shows
    every run's log while the terminal shows warnings and errors (all of it with -v)."""
    from deployments.server_settings import apply_server_settings

    apply_server_settings()
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _check_prefect_api() -> None:
    """Reach Prefect's API (starting the temporary local server if none is set) or say why not."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    url = PREFECT_API_URL.value()
    try:
        with get_client(sync_client=True) as client:
            problem = client.api_healthcheck()
    except Exception as exc:  # whatever the cause, the cohort cannot run: say what and how to fix
        problem = exc
    if problem is None:
        return
    cause = (str(problem).splitlines() or [type(problem).__name__])[0].rstrip(".")
    if url:
        _fail(
            FleetError(
                f"cannot reach the Prefect API at {url}: {cause}. Start it with "
                "`uv run prefect server start`, or unset PREFECT_API_URL to use a temporary local "
                "server."
            )
        )
    _fail(
        FleetError(
            f"the temporary Prefect API server did not start: {cause}. On a busy machine raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
            f"(now {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s), "
            "or run `uv run prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api."
        )
    )


def _progress_table(
    store,
    app_ids: list[str],
    started: float | None = None,
    counts: dict[str, tuple[str, int, int]] | None = None,
) -> Table:
    """The live cohort table. A refresh reads every state in one store call; an app's task
    counts (kept in `counts` between refreshes) are read again only when its stage moved:
    they change with it. The refresh shares the store with the app runs (4 calls per app
    every 0.5 s took most of the store's traffic at 89 apps)."""
    counts = {} if counts is None else counts
    states = {s.app_id: s for s in store.list_states()}
    table = Table(title="fleet cohort — live", expand=False)
    if started is not None:
        finished = sum(1 for a in app_ids if (st := states.get(a)) and st.stage.terminal)
        table.caption = (
            f"{finished}/{len(app_ids)} finished · {time.monotonic() - started:.0f}s elapsed"
        )
    for col in ("app", "stage", "skill tasks", "adversarial issues", "error"):
        table.add_column(col)
    for app_id in app_ids:
        state = states.get(app_id)
        stage = state.stage.value if state else "waiting"
        if app_id not in counts or counts[app_id][0] != stage:
            skill, adversarial = (
                len(store.list_tasks(app_id, s)) for s in ("skill", "adversarial")
            )
            counts[app_id] = (stage, skill, adversarial)
        _, skill, adversarial = counts[app_id]
        table.add_row(
            app_id,
            f"[{STAGE_STYLE.get(stage, 'yellow')}]{stage}[/]",
            str(skill),
            str(adversarial),
            (state.error or "")[:60] if state else "",
        )
    return table


class _LiveTable:
    """The live table's next frame: the store's view, or while the store cannot be read the
    last view seen with a note saying so. Never raises: the table outlives a store outage."""

    def __init__(self, store, app_ids: list[str], started: float):
        self.store, self.app_ids, self.started = store, app_ids, started
        self.last: Table | None = None
        self.down_since: float | None = None
        self.counts: dict[str, tuple[str, int, int]] = {}  # task counts kept between frames

    def frame(self) -> Table:
        try:
            self.last = _progress_table(self.store, self.app_ids, self.started, self.counts)
            self.down_since = None
            return self.last
        except Exception as exc:  # whatever the store raised, the run goes on without a view
            now = time.monotonic()
            self.down_since = self.down_since or now
            table = self.last or _progress_table(_NoStore(), self.app_ids)
            cause = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
            table.caption = (
                f"store unavailable for {now - self.down_since:.0f}s — showing the last state "
                f"seen · {now - self.started:.0f}s elapsed ({escape(cause)})"
            )
            return table


class _NoStore:
    """What the live table shows before the store was ever read: every app waiting."""

    def list_states(self) -> list:
        return []

    def list_tasks(self, app_id: str, source: str) -> list:
        return []


@contextmanager
def _live_progress(screen: Console, store, app_ids: list[str]) -> Iterator[None]:
    """The live cohort table, a frame every 0.5 s while the block runs, in a terminal only:
    elsewhere (a pipe, a CI log) Rich shows no live view, and every frame reads the store
    while the apps use it."""
    if not screen.is_terminal:
        yield
        return
    stop = threading.Event()
    view = _LiveTable(store, app_ids, time.monotonic())
    with Live(view.frame(), console=screen, refresh_per_second=4, transient=True) as live:

        def refresh() -> None:
            while not stop.wait(0.5):
                live.update(view.frame())

        watcher = threading.Thread(target=refresh, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _run_cohort(
    fleet_file: Path, size: int | None, fresh: bool, retry_failed: bool, verbose: bool
) -> None:
    _prepare_prefect(verbose)
    from prefect.exceptions import FailedRun

    from fleet.wiring import components
    from flows.cohort import cohort_rows, fleet_cohort

    settings = get_settings()
    try:
        comp = components(settings, fleet_file)
    except FleetError as exc:
        _fail(exc)
    console.print(
        f"[bold]fleet[/] {comp.fleet.name}: {len(comp.fleet.apps)} apps · "
        + " · ".join(f"{k}={v}" for k, v in comp.describe().items())
    )
    try:
        _check_prefect_api()
    except KeyboardInterrupt:
        err.print("interrupted before any app started: nothing was run")
        raise typer.Exit(130) from None

    async def cohort():  # Completed or Failed, the run's rows
        state = await fleet_cohort(
            size=size,
            fleet_file=str(fleet_file),
            fresh=fresh,
            retry_failed=retry_failed,
            return_state=True,
        )
        return await cohort_rows(state)

    failure: FailedRun | None = None
    with _live_progress(console, comp.store, comp.fleet.app_ids):
        try:
            rows = asyncio.run(cohort())
        except KeyboardInterrupt:
            rows = None
        except FailedRun as exc:  # ended cleanly as failed (a store outage past its budget)
            failure, rows = exc, []
    if failure is not None:
        _fail(failure, 1)
    if rows is None:
        err.print(
            "interrupted: apps in flight keep their persisted stage and resume on the next run"
        )
        raise typer.Exit(130)
    console.print(result_table(rows))
    for row in rows:
        for note in row.notes:
            console.print(f"[dim]{row.app}:[/] {note}")
        if row.error:
            console.print(f"[red]{row.app}:[/] {row.error}")
    if any(r.stage == "failed" for r in rows):
        raise typer.Exit(1)


@app.command()
def demo(
    size: int | None = typer.Option(
        None, min=1, help="cohort size, at least 1 (default: progressive 10 → 20 → 40)"
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="recreate the demo repos and rerun every app"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Prefect's logs too"),
) -> None:
    """Run the bundled demo fleet through all seven stages on the embedded defaults."""
    from fleet.demo import create_demo_fleet

    settings = get_settings()
    # Demo apps evolve in seconds: poll the local gate every second instead of every 5 min.
    os.environ.setdefault("FLEET_HYDRA_POLL_SECONDS", "1")
    get_settings.cache_clear()
    try:
        path = create_demo_fleet(settings.home / "demo", fresh=fresh)
    except FleetError as exc:
        _fail(exc)
    if fresh:
        _reset_store_for(path)
    console.print(f"[dim]demo fleet at {path} (state in {settings.home})[/]")
    _run_cohort(path, size, fresh, retry_failed=False, verbose=verbose)


def _reset_store_for(fleet_file: Path) -> None:
    """A fresh demo starts from empty state: its repos were recreated, so old tasks are stale."""
    settings = get_settings()
    db = Path(settings.resolved_store_url().removeprefix("sqlite:///"))
    if settings.resolved_store_url().startswith("sqlite:///"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)


@app.command()
def run(
    fleet: Path | None = typer.Option(
        None, "--fleet", "-f", help="fleet file (default FLEET_FLEET_FILE)"
    ),
    size: int | None = typer.Option(
        None, min=1, help="cohort size, at least 1 (default: progressive 10 → 20 → 40)"
    ),
    fresh: bool = typer.Option(False, "--fresh", help="rerun apps that are already complete"),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="rerun apps that failed earlier"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the next cohort of a fleet file on the configured store, dispatcher and gate."""
    from fleet.wiring import fleet_path

    try:
        path = fleet_path(get_settings(), fleet)
    except FleetError as exc:
        _fail(exc)
    _run_cohort(path, size, fresh, retry_failed, verbose)


def _store():
    from fleet.store import open_store

    try:
        return open_store(get_settings().resolved_store_url())
    except FleetError as exc:
        _fail(exc)


@app.command()
def status(
    cost: bool = typer.Option(
        False, "--cost", help="the work ledger: agent tries, time, tokens and dollars"
    ),
) -> None:
    """Every app's stage, claim and error, as the store has them."""
    store = _store()
    if cost:
        _cost_tables(store)
        return
    table = Table(title="app evolution states")
    for col in ("app", "stage", "owner", "lease until", "updated", "error"):
        table.add_column(col)
    for s in store.list_states():
        table.add_row(
            s.app_id,
            f"[{STAGE_STYLE.get(s.stage.value, 'yellow')}]{s.stage.value}[/]",
            s.owner or "",
            str(s.lease_until or ""),
            str(s.updated_at or ""),
            (s.error or "")[:80],
        )
    console.print(table)
    from fleet.clock import utcnow
    from fleet.store.leadership import PLANNER, describe_leader

    console.print(describe_leader(store.get_lease(PLANNER), utcnow()))


def _cost_tables(store) -> None:
    """The ledger summed per app, per cohort run and per account, and the open cohort's spend."""
    from fleet.ledger import totals_table

    titles = {"app": "app", "run": "cohort run", "account": "account"}
    for by, title in titles.items():
        rows = totals_table(store.work_totals(by))
        table = Table(title=f"work ledger — per {title}")
        table.add_column(title, overflow="fold")
        for col in ("tasks", "tries", "agent time (s)", "tokens in", "tokens out", "cost (USD)"):
            table.add_column(col, justify="right")
        for row in rows:
            row["key"] = row["key"] or "(not reported)"
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
    # The budget the runs use: environment > FleetConfig block > store, as `fleet config show`.
    budget = _config_sources(store)[0]["cohort_budget_usd"]
    limit = (
        f" of ${budget.value:.2f} (cohort_budget_usd, from {budget.source})"
        if budget.value is not None
        else " (no budget)"
    )
    console.print(f"open cohort spent ${store.open_cohort_spend():.4f}{limit}")


@app.command()
def reset(app_id: str = typer.Argument(..., help="app to put back in the queue")) -> None:
    """Put an app back to `queued` (its tasks are kept) so the next cohort runs it again."""
    from fleet.clock import utcnow
    from fleet.models import validate_app_id

    try:
        validate_app_id(app_id)
    except FleetError as exc:
        _fail(exc)
    store = _store()
    if store.get_state(app_id) is None:
        _fail(FleetError(f"no app {app_id!r} in the store; `fleet status` lists the known apps"))
    store.reset_app(app_id, utcnow())
    console.print(f"{app_id} is queued again")


@app.command("check-config")
def check_config(path: Path = typer.Argument(..., help="a fleet file to validate")) -> None:
    """Validate a fleet file: prints OK, or each problem with its file and line."""
    from fleet.fleetfile import load_fleet

    try:
        fleet = load_fleet(path)
    except FleetError as exc:
        _fail(exc)
    console.print(f"[green]OK[/] {path}: fleet {fleet.name!r}, {len(fleet.apps)} apps")


def _config_block(name: str):
    """The FleetConfig block `name`, read through the Prefect API, or a clean exit saying why."""
    from flows.config import load_config_block

    try:
        return load_config_block(name)
    except FleetError as exc:
        _fail(exc)
    except Exception as exc:  # the Prefect API is down or unset: the block cannot be read
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        _fail(
            FleetError(
                f"cannot read the FleetConfig block {name!r} (FLEET_CONFIG_BLOCK): {cause} — "
                "set PREFECT_API_URL to the server that holds it, or unset FLEET_CONFIG_BLOCK"
            )
        )


def _deployed_config_block() -> tuple[str, str] | None:
    """(block, where) when deployed runs get FLEET_CONFIG_BLOCK from a deployment's job
    variables or a work pool's base job template; only asked when PREFECT_API_URL is set."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            for d in client.read_deployments():
                name = ((d.job_variables or {}).get("env") or {}).get("FLEET_CONFIG_BLOCK")
                if name:
                    return str(name), f"deployment {d.name!r}'s job variables"
            for pool in client.read_work_pools():
                props = pool.base_job_template.get("variables", {}).get("properties", {})
                name = (props.get("env", {}).get("default") or {}).get("FLEET_CONFIG_BLOCK")
                if name:
                    return str(name), f"work pool {pool.name!r}'s base job template"
    except Exception:  # no API to ask: only this shell's environment counts
        return None
    return None


def _config_sources(store):
    """Every setting with its source (fleet/config_sources.py), for this shell and the block
    that runs use: FLEET_CONFIG_BLOCK here, else the one deployments or work pools set."""
    from fleet.config_sources import config_sources

    settings = get_settings()
    name, where = settings.config_block, "FLEET_CONFIG_BLOCK"
    if not name and (deployed := _deployed_config_block()):
        name, where = deployed
    block = _config_block(name) if name else None
    sources = config_sources(
        settings,
        os.environ,
        store.get_fleet_config().model_dump(),
        block.fields() if block else None,
    )
    return sources, name, where


@config_app.command("show")
def config_show(
    show_all: bool = typer.Option(False, "--all", help="every setting, defaults included"),
    as_json: bool = typer.Option(False, "--json", help="{setting: {value, source}} as JSON"),
) -> None:
    """Each setting's value and where it comes from: environment > block > store > default."""
    from fleet.config_sources import PRECEDENCE
    from fleet.models import FleetConfig

    sources, block, where = _config_sources(_store())
    live = set(FleetConfig.model_fields)  # the store's knobs are always shown
    shown = {n: s for n, s in sources.items() if show_all or s.source != "default" or n in live}
    if as_json:
        console.print_json(
            data={n: {"value": s.shown, "source": s.source} for n, s in shown.items()}
        )
        return
    table = Table(title="fleet config — " + " > ".join(PRECEDENCE))
    for col in ("setting", "value", "source", "also set by (not applied)"):
        table.add_column(col)
    for name, s in shown.items():
        source = f"block {block}" if s.source == "block" else s.source
        table.add_row(name, escape(str(s.shown)), source, ", ".join(s.shadowed))
    console.print(table)
    if block:
        console.print(f"[dim]FleetConfig block {block} (from {where})[/]")


@config_app.command("set-max-concurrent")
def config_set_max_concurrent(value: int = typer.Argument(..., min=1, max=1000)) -> None:
    """How many apps a cohort run may start at once (read by every cohort run).

    Refused when the environment or the FleetConfig block pins max_concurrent: the store's
    value would not apply, and the message says where to change it instead."""
    from fleet.config_sources import shadowed_write

    store = _store()
    sources, block, _ = _config_sources(store)
    if pinned := shadowed_write(sources, "max_concurrent", block_name=block):
        _fail(FleetError(f"not changed: {pinned}"))
    store.set_fleet_config(store.get_fleet_config().model_copy(update={"max_concurrent": value}))
    console.print(f"max_concurrent = {value} (store)")


def _mount_subcommands() -> None:
    from fleet.mesh.cli import agent_app
    from fleet.supervisor.cli import supervise_app

    app.add_typer(
        supervise_app, name="supervise", help="Guard agent changes; manage helper processes."
    )
    app.add_typer(agent_app, name="agent", help="Run a mesh node agent on this machine.")
    from fleet.mesh.cli import chaos_app, mesh_app, metrics_app

    app.add_typer(mesh_app, name="mesh", help="The mesh as a whole: quarantines.")
    app.add_typer(chaos_app, name="chaos", help="Inject a fault for a while, then revert it.")
    app.add_typer(metrics_app, name="metrics", help="Prometheus metrics of the mesh and the fleet.")
    from fleet.automations_cli import app as automations_app
    from fleet.tuning.cli import ga_app

    app.add_typer(automations_app, name="automations", help="Prefect alerts for failures.")
    app.add_typer(ga_app, name="ga", help="Tune the healing thresholds on recorded history.")


_mount_subcommands()

if __name__ == "__main__":
    app()
