"""EVOLVE on a local repo: each agent attempt runs under the supervisor's change guard."""

from __future__ import annotations

import asyncio
import logging

from fleet.claim import AppRun, run_once
from fleet.errors import StageFailed
from fleet.supervisor.guard import ChangeGuard
from fleet.supervisor.snapshot import Snapshot, dump_snapshot, load_snapshot

log = logging.getLogger("fleet.evolve")
GUARDED = "evolve-guarded"  # the marker of a change the guard accepted
SNAPSHOT = "evolve-snapshot"  # the recorded pre-attempt snapshot of each attempt


async def guarded_evolve(run: AppRun) -> None:
    """Run the evolve command until the guard accepts a change, at most `evolve_attempts` times.

    A rejected attempt is rolled back (its diff kept as a patch) and the next attempt is
    told why, so an agent that touched a protected path gets one clear chance to redo it.
    An attempt whose dispatch fails or times out is rolled back too, then the error propagates.
    The guard's git steps are short and run on a worker thread; the agent is awaited, so a
    long evolve holds no thread.
    """
    app, s = run.app, run.settings
    accepted_key = run.effect_key(GUARDED, 1)
    if (accepted := await run.get_effect(accepted_key)) is not None:
        # A resume after the guard had accepted a change: that change stands, no new agent.
        run.notes.append(
            f"the change guard had accepted evolve attempt {accepted.value}: not evolved again"
        )
        return
    guard = guard_for(run)
    feedback = ""
    for attempt in range(1, s.evolve_attempts + 1):
        await run.renew()  # the attempts together may outlast one lease
        snapshot = await pre_attempt_snapshot(run, guard, attempt)
        try:
            command = run.command(run.fleet.commands.evolve, feedback)

            async def start(key: str, command: list[str] = command) -> str:
                return await run.dispatcher.spawn(command, idempotency_key=key)

            await run_once(run, "evolve", attempt, "spawn", start, s.skill_timeout_seconds)
            await run.renew()  # a run that lost the app meanwhile commits nothing
        except BaseException as exc:
            # A failed or stopped agent may have left half an edit, protected paths included:
            # undo all of it so it never becomes the next snapshot's baseline. Shielded: a
            # cancelled run still rolls back before it goes.
            reason = f"evolve attempt {attempt} did not finish: {exc}"
            patch = await asyncio.shield(asyncio.to_thread(guard.rollback, snapshot, reason))
            log.warning(
                "%s: evolve attempt %d did not finish, rolled back (patch kept: %s)",
                app.id,
                attempt,
                patch,
            )
            raise
        verdict = await asyncio.to_thread(guard.validate, snapshot)
        if verdict.accepted:
            await run.record_effect(accepted_key, "marker", str(attempt))
            return
        note = f"change guard rejected attempt {attempt}: {verdict.reason}"
        if verdict.patch_path:
            note += f" (patch kept: {verdict.patch_path})"
        log.warning("%s: %s", app.id, note)
        run.notes.append(note)
        feedback = (
            f"Your previous change was rolled back: {verdict.reason}. "
            f"Protected paths must never change: {', '.join(guard.protected.globs)}."
        )
    raise StageFailed(
        f"change guard rejected all {s.evolve_attempts} evolve attempts: {verdict.reason}"
    )


def guard_for(run: AppRun) -> ChangeGuard:
    """The change guard of the app's local repo, with the fleet's and the app's protected paths."""
    app, s = run.app, run.settings
    assert app.repo is not None, "a guarded evolve needs the app's local repo"
    return ChangeGuard(
        app.repo,
        protected=[*run.fleet.protected, *app.protected],
        check_command=app.check,
        patches_dir=s.home / "patches" / app.id,
        check_timeout=s.check_timeout_seconds,
        clock=run.clock,
    )


async def pre_attempt_snapshot(run: AppRun, guard: ChangeGuard, attempt: int) -> Snapshot:
    """The snapshot `attempt` is validated against, recorded before its agent starts.

    A resumed attempt gets the one its dead run recorded, never a new one: the repo may
    already hold what that run's agent wrote after the crash, and a snapshot of it would
    make those edits (protected paths included) the baseline that passes validation.
    """
    key = run.effect_key(SNAPSHOT, attempt)
    if (recorded := await run.get_effect(key)) is not None:
        log.info(
            "%s: evolve attempt %d validates against its recorded snapshot", run.app_id, attempt
        )
        return load_snapshot(recorded.value)
    snapshot = await asyncio.to_thread(guard.snapshot)
    dumped = dump_snapshot(snapshot)
    stored = await run.record_effect(key, "snapshot", dumped)  # the first recorded wins
    return snapshot if stored == dumped else load_snapshot(stored)
