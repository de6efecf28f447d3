"""The cost and work ledger: each try of an agent task measured and recorded, then summed.

One place records: `measured` wraps the wait for an agent's answer in `claim.run_once`
(DISPATCH, REVIEW, SHIP all go through it). A try's wall time is from its start (or the
resumed poll) to its answer or failure; tokens, dollars and the account come from the
agent's own `COST:` / `TOKENS:` / `ACCOUNT:` lines (fleet.parsing.parse_usage), else stay
unknown. Rows are attributed to the cohort run the work is for (`current_cohort`, set by
the flows from Prefect's root flow run), else to the claim's run id.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from fleet.parsing import parse_usage
from fleet.store.base import WorkEntry, WorkTotal

if TYPE_CHECKING:
    from fleet.claim import AppRun

log = logging.getLogger("fleet.ledger")

# The cohort run the current flow run works for (a fanned-out app run's root flow run).
current_cohort: ContextVar[str | None] = ContextVar("current_cohort", default=None)


def work_entry(
    run: AppRun,
    stage: str,
    task_key: str,
    started: datetime,
    output: str | None,
) -> WorkEntry:
    """One try, measured: `output` None means it ended without an answer."""
    usage = parse_usage(output) if output is not None else None
    outcome: Literal["answered", "failed"] = "answered" if output is not None else "failed"
    return WorkEntry(
        id=uuid.uuid4().hex,
        app_id=run.app_id,
        run_id=current_cohort.get() or run.run_id,
        stage=stage,
        task_key=task_key,
        account=(usage.account if usage else None) or run.settings.agent_account,
        outcome=outcome,
        wall_seconds=max(0.0, (run.clock.now() - started).total_seconds()),
        tokens_in=usage.tokens_in if usage else None,
        tokens_out=usage.tokens_out if usage else None,
        cost_usd=usage.cost_usd if usage else None,
        recorded_at=run.clock.now(),
    )


async def record_try(
    run: AppRun, stage: str, task_key: str, started: datetime, output: str | None
) -> None:
    """Record one try. Bookkeeping, not the pipeline's truth: a failure to record is logged
    and the stage goes on."""

    def record() -> None:
        run.store.record_work(work_entry(run, stage, task_key, started, output))

    try:
        await run.call(record)
    except Exception as exc:
        log.warning("%s: the %s try was not recorded in the ledger: %s", run.app_id, stage, exc)


async def measured(
    run: AppRun, stage: str, task_key: str, started: datetime, answer: Awaitable[str]
) -> str:
    """Await the agent's answer and record the try, answered or not."""
    try:
        output = await answer
    except Exception:
        await record_try(run, stage, task_key, started, None)
        raise
    await record_try(run, stage, task_key, started, output)
    return output


def budget_left(spent: float, budget: float | None) -> str | None:
    """Why no new app may start (one line), or None while the budget allows it."""
    if budget is None or spent < budget:
        return None
    return (
        f"cohort budget spent: ${spent:.2f} of ${budget:.2f} (cohort_budget_usd); no new apps "
        "start, running apps finish — raise the budget or finish the cohort to go on"
    )


def totals_table(totals: list[WorkTotal]) -> list[dict[str, object]]:
    """Rows for a table (CLI or artifact): unknown tokens and dollars show as empty."""
    return [
        {
            "key": t.key,
            "tasks": t.tasks,
            "attempts": t.attempts,
            "wall_s": round(t.wall_seconds, 1),
            "tokens_in": t.tokens_in if t.tokens_in is not None else "",
            "tokens_out": t.tokens_out if t.tokens_out is not None else "",
            "cost_usd": f"{t.cost_usd:.4f}" if t.cost_usd is not None else "",
        }
        for t in totals
    ]


def with_costs(records: list[dict], totals: list[WorkTotal]) -> list[dict]:
    """The cohort table's rows (keyed by `app`) with each app's tries, time and cost."""
    by_app = {t.key: t for t in totals}
    out = []
    for record in records:
        t = by_app.get(str(record.get("app")))
        out.append(
            {
                **record,
                "agent_tries": t.attempts if t else 0,
                "agent_s": round(t.wall_seconds, 1) if t else 0.0,
                "tokens": _tokens(t) if t else "",
                "cost_usd": f"{t.cost_usd:.4f}" if t and t.cost_usd is not None else "",
            }
        )
    return out


def cost_summary(totals: list[WorkTotal]) -> str:
    """' · 7 agent tries, 312 s, $1.2345' for an artifact's description ('' without tries)."""
    if not totals:
        return ""
    tries = sum(t.attempts for t in totals)
    seconds = sum(t.wall_seconds for t in totals)
    costs = [t.cost_usd for t in totals if t.cost_usd is not None]
    dollars = f", ${sum(costs):.4f}" if costs else ", cost not reported"
    return f" · {tries} agent tries, {seconds:.0f} s{dollars}"


def _tokens(t: WorkTotal) -> str:
    if t.tokens_in is None and t.tokens_out is None:
        return ""
    return f"in={t.tokens_in or 0} out={t.tokens_out or 0}"
