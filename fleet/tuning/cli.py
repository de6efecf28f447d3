"""`fleet ga`: evolve the healing thresholds on replayed history, apply one by canary, decide
trials, roll back."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleet.errors import FleetError
from fleet.tuning.genome import GENE_NAMES, current_policy

ga_app = typer.Typer(
    help="The healing tuner: a GA replays the mesh's history to set the healing "
    "thresholds, applied by canary.",
    no_args_is_help=True,
)
console = Console(width=160)
err = Console(stderr=True)


def _fail(exc: Exception | str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers: the command is still named
        return "cli"


def _stores(store_url: str) -> tuple[Any, Any, Any]:
    from fleet.mesh.open import open_mesh_store
    from fleet.settings import get_settings
    from fleet.tuning.policies import open_policy_store

    settings = get_settings()
    url = store_url or settings.resolved_store_url()
    return settings, open_mesh_store(url), open_policy_store(url)


def _short(name: str) -> str:
    return name.removeprefix("immune_").replace("_seconds", "_s").replace("liveness_", "")


def _changes(policy: dict[str, float], base: dict[str, float]) -> str:
    moved = [f"{_short(n)}={policy[n]:g}" for n in GENE_NAMES if policy[n] != base[n]]
    return ", ".join(moved) or "(same as current)"


StoreUrl = typer.Option("", "--store-url", help="default FLEET_STORE_URL or <home>/fleet.db")


@ga_app.command("evolve")
def evolve_cmd(
    steps: int = typer.Option(10, "--steps", min=1, help="generations"),
    since: str = typer.Option("7d", "--since", help="history window, e.g. 7d, 12h"),
    seed: int = typer.Option(0, "--seed", help="the same seed and history give the same front"),
    population: int = typer.Option(20, "--population", min=4, help="individuals per generation"),
    history: str = typer.Option(
        "both",
        "--history",
        help="recorded (the store's window), synthetic, or both; the "
        "labelled synthetic histories are always replayed too",
    ),
    record: bool = typer.Option(
        True, "--record/--no-record", help="record the front as candidate versions for `ga apply`"
    ),
    store_url: str = StoreUrl,
) -> None:
    """Print the Pareto front (MTTR vs false positives) beside the current policy, and the
    convergence per generation."""
    from fleet.tuning.tuner import gather, parse_since, run_evolve

    now = datetime.now(UTC)
    try:
        window = parse_since(since)
        settings, mesh, policies = _stores(store_url)
        histories = gather(
            history,
            mesh_store=mesh,
            since=window,
            now=now,
            seed=seed,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
        proposal = run_evolve(
            histories,
            settings,
            steps=steps,
            seed=seed,
            pop_size=population,
            policies=policies if record else None,
            by=_who(),
            now=now,
        )
    except FleetError as exc:
        _fail(exc)
    evo = proposal.evolution
    base = evo.current
    names = ", ".join(h.name for h in histories)
    console.print(
        f"replayed {len(histories)} histories ({names}); {evo.evaluations} policies "
        f"evaluated in {evo.seconds:.1f} s, seed {seed}"
    )
    table = Table(title="Pareto front (offerable: no false positive added on any labelled history)")
    columns = ("version", "MTTR s", "vs current", "false pos.", "misses", "work lost h", "changes")
    for col in columns:
        table.add_column(col)
    cur = base.score
    table.add_row(
        "current",
        f"{cur.penalized_mttr:.0f}",
        "",
        str(cur.false_positives),
        str(cur.misses),
        f"{cur.work_lost / 3600:.1f}",
        "(settings in force)",
    )
    by_key = {id(c): v for v, c in proposal.versions.items()}
    for c in evo.front:
        s = c.score
        change = (s.penalized_mttr / cur.penalized_mttr - 1) if cur.penalized_mttr else 0.0
        table.add_row(
            str(by_key.get(id(c), "-")),
            f"{s.penalized_mttr:.0f}",
            f"{change:+.0%}",
            str(s.false_positives),
            str(s.misses),
            f"{s.work_lost / 3600:.1f}",
            escape(_changes(c.policy, base.policy)),
        )
    console.print(table)
    conv = Table(title=f"convergence (converged at generation {evo.converged_at})")
    for col in ("generation", "evaluations", "best MTTR s", "its false pos.", "front"):
        conv.add_column(col)
    for g in evo.generations:
        conv.add_row(
            str(g.n),
            str(g.evaluations),
            f"{g.best_mttr:.0f}",
            str(g.best_false_positives),
            str(g.front),
        )
    console.print(conv)
    best = evo.best()
    if best is None or best.score.penalized_mttr >= cur.penalized_mttr:
        console.print(
            "no candidate heals faster without more false positives than the current policy"
        )
    elif record:
        version = by_key.get(id(best))
        console.print(
            f"best: version {version} — try it with `fleet ga apply {version} --canary 20%`"
        )


@ga_app.command("apply")
def apply_cmd(
    candidate: int = typer.Argument(..., help="policy version from `fleet ga evolve`"),
    canary: str = typer.Option(..., "--canary", help="share of the machines that run it, e.g. 20%"),
    store_url: str = StoreUrl,
) -> None:
    """Run a candidate on a share of the machines (never all at once) and record the trial."""
    from fleet.tuning.policies import parse_share
    from fleet.tuning.tuner import workers

    try:
        share = parse_share(canary)
        settings, mesh, policies = _stores(store_url)
        trial = policies.start_trial(
            candidate,
            workers(mesh),
            share,
            baseline=current_policy(settings),
            by=_who(),
            now=datetime.now(UTC),
        )
    except FleetError as exc:
        _fail(exc)
    console.print(
        f"trial {trial.id}: policy {trial.candidate} on {', '.join(trial.machines)} "
        f"({len(trial.machines)} machines); control: policy {trial.control} on the rest. "
        "`fleet ga trials` decides it."
    )
    console.print(
        "the canary machines' agents take the candidate's heartbeat at their next beat; the "
        "reconciler and the watchdog judge them by its thresholds from their next cycle"
    )


@ga_app.command("trials")
def trials_cmd(
    decide_now: bool = typer.Option(
        True, "--decide/--no-decide", help="promote or roll back the running trial when due"
    ),
    min_hours: float = typer.Option(24.0, "--min-hours", help="age before a trial may be promoted"),
    store_url: str = StoreUrl,
) -> None:
    """Compare canary and control on live figures; promote, or roll back (at once on a
    false-positive regression)."""
    from fleet.tuning.tuner import judge

    try:
        _, mesh, policies = _stores(store_url)
        verdict = judge(
            policies,
            mesh,
            now=datetime.now(UTC),
            by=_who(),
            min_seconds=min_hours * 3600,
            act=decide_now,
        )
        trials = policies.trials()
    except FleetError as exc:
        _fail(exc)
    if verdict is not None:
        for name, f in (("canary", verdict.canary), ("control", verdict.control)):
            console.print(
                f"{name}: {f['machines']} machines, {f['requeues']} requeues, "
                f"{f['false_positives']} false positives, MTTR {f['mttr']:.0f} s"
            )
        console.print(f"trial {verdict.trial.id}: {verdict.action} — {escape(verdict.why)}")
    table = Table(title="canary trials")
    for col in ("trial", "candidate", "control", "share", "machines", "status", "started", "why"):
        table.add_column(col)
    for t in policies.trials():
        table.add_row(
            str(t.id),
            str(t.candidate),
            str(t.control),
            f"{t.share:.0%}",
            ", ".join(t.machines),
            t.status,
            t.started_at.strftime("%Y-%m-%d %H:%M"),
            escape(str(t.decision.get("why") or t.decision.get("reason") or "")),
        )
    if not trials:
        console.print("no trials yet — `fleet ga apply VERSION --canary 20%` starts one")
    else:
        console.print(table)


@ga_app.command("rollback")
def rollback_cmd(
    reason: str = typer.Option("operator", "--reason"),
    store_url: str = StoreUrl,
) -> None:
    """End the running trial, else return to the policy active before the current one."""
    try:
        _, _, policies = _stores(store_url)
        version = policies.rollback(by=_who(), now=datetime.now(UTC), reason=reason)
    except FleetError as exc:
        _fail(exc)
    console.print(f"policy {version} is in force on every machine")


@ga_app.command("policies")
def policies_cmd(
    store_url: str = StoreUrl, limit: int | None = typer.Option(20, "--limit")
) -> None:
    """The recorded policy versions, newest last."""
    try:
        _, _, policies = _stores(store_url)
        versions = policies.versions()
    except FleetError as exc:
        _fail(exc)
    table = Table(title="healing policies")
    for col in ("version", "status", "MTTR s", "false pos.", "guard", "by", "created"):
        table.add_column(col)
    for v in versions[-(limit or len(versions)) :]:
        f = v.figures
        table.add_row(
            str(v.version),
            v.status,
            str(f.get("mttr_seconds", "")),
            str(f.get("false_positives", "")),
            str(f.get("guard", "")),
            v.created_by,
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)
