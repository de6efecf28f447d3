"""EVOLVE on a local repo: each agent attempt runs under the supervisor's change guard."""

from __future__ import annotations

import logging

from fleet.errors import StageFailed
from fleet.models import Stage
from fleet.supervisor.guard import ChangeGuard

log = logging.getLogger("fleet.evolve")


def guarded_evolve(run) -> None:  # run: fleet.pipeline.AppRun (imported lazily to avoid a cycle)
    """Run the evolve command until the guard accepts a change, at most `evolve_attempts` times.

    A rejected attempt is rolled back (its diff kept as a patch) and the next attempt is
    told why, so an agent that touched a protected path gets one clear chance to redo it.
    An attempt whose dispatch fails or times out is rolled back too, then the error propagates.
    """
    app, s = run.app, run.settings
    guard = ChangeGuard(
        app.repo,
        protected=[*run.fleet.protected, *app.protected],
        check_command=app.check,
        patches_dir=s.home / "patches" / app.id,
        check_timeout=s.check_timeout_seconds,
        clock=run.clock,
    )
    feedback = ""
    for attempt in range(1, s.evolve_attempts + 1):
        # Each fenced write renews the claim: the attempts together may outlast one lease.
        run.set_stage(Stage.HYDRA_BUILD)
        snapshot = guard.snapshot()
        try:
            task_id = run.dispatcher.spawn(run.command(run.fleet.commands.evolve, feedback))
            run.dispatcher.poll_and_retrieve(task_id, s.skill_timeout_seconds)
            run.set_stage(Stage.HYDRA_BUILD)  # a run that lost the app meanwhile commits nothing
        except BaseException as exc:
            # A failed or stopped agent may have left half an edit, protected paths included:
            # undo all of it so it never becomes the next snapshot's baseline.
            patch = guard.rollback(snapshot, f"evolve attempt {attempt} did not finish: {exc}")
            log.warning("%s: evolve attempt %d did not finish, rolled back (patch kept: %s)", app.id, attempt, patch)
            raise
        verdict = guard.validate(snapshot)
        if verdict.accepted:
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
    raise StageFailed(f"change guard rejected all {s.evolve_attempts} evolve attempts: {verdict.reason}")
