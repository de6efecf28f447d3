"""EVOLVE on a local repo: each agent attempt runs under the supervisor's change guard."""

from __future__ import annotations

import asyncio
import logging

from fleet.claim import AppRun, run_once
from fleet.errors import StageFailed
from fleet.supervisor.guard import ChangeGuard

log = logging.getLogger("fleet.evolve")
GUARDED = "evolve-guarded"  # the marker of a change the guard accepted


async def guarded_evolve(run: AppRun) -> None:
    """Run the evolve command until the guard accepts a change, at most `evolve_attempts` times.

    A rejected attempt is rolled back (its diff kept as a patch) and the next attempt is
    told why, so an agent that touched a protected path gets one clear chance to redo it.
    An attempt whose dispatch fails or times out is rolled back too, then the error propagates.
    The guard's git steps are short and run on a worker thread; the agent is awaited, so a
    long evolve holds no thread.
    """
    app, s = run.app, run.settings
    repo = app.repo
    assert repo is not None, "a guarded evolve needs the app's local repo"
    accepted_key = run.effect_key(GUARDED, 1)
    if (accepted := await run.get_effect(accepted_key)) is not None:
        # A resume after the guard had accepted a change: that change stands, no new agent.
        run.notes.append(
            f"the change guard had accepted evolve attempt {accepted.value}: not evolved again"
        )
        return
    guard = ChangeGuard(
        repo,
        protected=[*run.fleet.protected, *app.protected],
        check_command=app.check,
        patches_dir=s.home / "patches" / app.id,
        check_timeout=s.check_timeout_seconds,
        clock=run.clock,
    )
    feedback = ""
    for attempt in range(1, s.evolve_attempts + 1):
        await run.renew()  # the attempts together may outlast one lease
        snapshot = await asyncio.to_thread(guard.snapshot)
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
