"""EVOLVE on a local repo: every agent attempt ends under the change guard, whatever it did."""

from __future__ import annotations

import subprocess

import pytest

from fleet.errors import AgentFailed, StaleLease
from fleet.evolve import guarded_evolve
from fleet.models import Stage
from tests.helpers import advance, app_run, demo_fleet, script


async def test_agent_that_fails_after_editing_a_protected_path_is_rolled_back(tmp_path):
    agent = script(
        tmp_path,
        "evolve_then_fail",
        (
            "import sys\n"
            "repo = sys.argv[1]\n"
            "open(repo + '/ci/protected.cfg', 'a').write('checks = off\\n')\n"
            "open(repo + '/app/calc.py', 'a').write('# half done\\n')\n"
            "sys.exit('gave up half way')\n"
        ),
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, evolve=[*agent, "{repo}"]))
    advance(run, Stage.HYDRA_BUILD)
    repo = run.app.repo
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout

    with pytest.raises(AgentFailed, match="gave up half way"):
        await guarded_evolve(run)

    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
    ).stdout
    assert status == ""  # neither edit survives to become the next snapshot's baseline
    assert (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout
        == head
    )
    patches = list((run.settings.home / "patches" / run.app.id).glob("*.patch"))
    assert len(patches) == 1 and "+checks = off" in patches[0].read_text()


async def test_a_run_that_lost_the_app_while_its_agent_worked_commits_nothing(tmp_path):
    agent = script(
        tmp_path,
        "evolve_while_reset",
        (
            "import sys\n"
            "from datetime import datetime, timezone\n"
            "from fleet.store.sqlite import SQLiteStore\n"
            "open(sys.argv[1] + '/app/calc.py', 'a').write('# a fine change\\n')\n"
            f"SQLiteStore({str(tmp_path / 'fleet.db')!r})"
            ".reset_app('demo-calc', datetime.now(timezone.utc))\n"
        ),
    )
    run = app_run(tmp_path, demo_fleet(tmp_path, evolve=[*agent, "{repo}"]))
    advance(run, Stage.HYDRA_BUILD)
    repo = run.app.repo
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout

    with pytest.raises(StaleLease):
        await guarded_evolve(run)

    assert (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout
        == head
    )
    assert (
        subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
        ).stdout
        == ""
    )
