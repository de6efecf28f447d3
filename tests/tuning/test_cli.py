"""`fleet ga` through typer's CliRunner on a real SQLite store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.tuning.cli import ga_app
from fleet.tuning.policies import open_policy_store

runner = CliRunner()


@pytest.fixture
def url(tmp_path, tmp_home) -> str:
    path = tmp_path / "fleet.db"
    mesh = SQLiteMeshStore(path)
    now = datetime.now(UTC)
    for m in ("mac1", "mac2", "mac3", "mac4", "mac5"):
        mesh.heartbeat(MachineIdentity(machine_id=m, mesh_id="prod"), now, None, [])
    return f"sqlite:///{path}"


def _evolve(url: str):
    return runner.invoke(
        ga_app,
        [
            "evolve",
            "--steps",
            "2",
            "--population",
            "4",
            "--since",
            "2h",
            "--history",
            "synthetic",
            "--seed",
            "1",
            "--store-url",
            url,
        ],
    )


def test_evolve_prints_the_front_beside_the_current_policy_and_the_convergence(url):
    result = _evolve(url)
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output and "current" in result.output
    assert "convergence" in result.output and "generation" in result.output
    versions = open_policy_store(url).versions()
    assert versions and all(v.status == "candidate" and v.offerable for v in versions)


def test_apply_needs_a_canary_then_trials_and_rollback(url):
    assert _evolve(url).exit_code == 0
    version = open_policy_store(url).versions()[0].version
    no_canary = runner.invoke(ga_app, ["apply", str(version), "--store-url", url])
    assert no_canary.exit_code == 2 and "--canary" in no_canary.output
    too_much = runner.invoke(ga_app, ["apply", str(version), "--canary", "80%", "--store-url", url])
    assert too_much.exit_code == 2 and "at most 50%" in too_much.output
    applied = runner.invoke(ga_app, ["apply", str(version), "--canary", "20%", "--store-url", url])
    assert applied.exit_code == 0, applied.output
    assert "trial 1" in applied.output and "candidate's heartbeat" in applied.output
    assert len(open_policy_store(url).assignments()) == 1
    trials = runner.invoke(ga_app, ["trials", "--store-url", url])
    assert trials.exit_code == 0, trials.output
    assert "wait" in trials.output and "running" in trials.output
    back = runner.invoke(ga_app, ["rollback", "--store-url", url])
    assert back.exit_code == 0 and "in force on every machine" in back.output
    assert open_policy_store(url).assignments() == {}
    listed = runner.invoke(ga_app, ["policies", "--store-url", url])
    assert listed.exit_code == 0 and "rolled_back" in listed.output


def test_user_mistakes_are_one_clear_line(url):
    missing = runner.invoke(ga_app, ["apply", "999", "--canary", "20%", "--store-url", url])
    assert missing.exit_code == 2 and "no policy version 999" in missing.output
    assert "Traceback" not in missing.output
    since = runner.invoke(ga_app, ["evolve", "--since", "forever", "--store-url", url])
    assert since.exit_code == 2 and "is not a duration" in since.output
    nothing = runner.invoke(ga_app, ["rollback", "--store-url", url])
    assert nothing.exit_code == 2 and "nothing to roll back" in nothing.output


def test_the_fleet_cli_starts_without_numpy_or_pymoo():
    """Every `fleet` command imports fleet.cli: the optimizer's libraries load only in the
    commands that evolve."""
    import subprocess
    import sys

    code = "import sys, fleet.cli\nprint(sorted(m for m in ('numpy', 'pymoo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
