"""The `fleet` command: clear messages (never tracebacks) for bad input, and the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLEET_STORE_URL", raising=False)
    monkeypatch.delenv("FLEET_FLEET_FILE", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_check_config_reports_file_and_line(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text(
        "commands:\n  skill: [a]\n  review: [b]\n  evolve: [c]\n  ship: [d]\n"
        "apps:\n  - id: 'Bad App'\n"
    )
    result = runner.invoke(app, ["check-config", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:7: apps[0].id" in result.output and "Traceback" not in result.output


def test_check_config_ok_on_the_demo_fleet(tmp_path):
    from fleet.demo import create_demo_fleet

    result = runner.invoke(app, ["check-config", str(create_demo_fleet(tmp_path / "demo"))])
    assert result.exit_code == 0 and "OK" in result.output and "3 apps" in result.output


def test_run_without_a_fleet_file_says_how_to_fix():
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2
    assert "no fleet file" in result.output and "fleet demo" in result.output


def test_reset_refuses_a_hostile_app_id():
    result = runner.invoke(app, ["reset", "app;rm -rf /"])
    assert result.exit_code == 2
    assert "[a-z0-9._-]" in result.output and "Traceback" not in result.output


def test_config_set_and_show_max_concurrent(monkeypatch):
    monkeypatch.delenv("FLEET_CONFIG_BLOCK", raising=False)
    monkeypatch.setenv("FLEET_REVIEW_TARGET", "mac9")
    get_settings.cache_clear()
    assert runner.invoke(app, ["config", "set-max-concurrent", "6"]).exit_code == 0
    shown = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
    assert shown["max_concurrent"] == {"value": 6, "source": "store"}
    assert shown["review_target"] == {"value": "mac9", "source": "environment"}
    assert "task_floor" not in shown  # defaults only with --all
    every = json.loads(runner.invoke(app, ["config", "show", "--all", "--json"]).output)
    assert every["task_floor"] == {"value": 3, "source": "default"}
    table = runner.invoke(app, ["config", "show"], env={"COLUMNS": "200"}).output
    assert "environment > block > store > default" in table
    assert runner.invoke(app, ["config", "set-max-concurrent", "0"]).exit_code == 2


def test_a_store_change_the_environment_overrides_is_refused(monkeypatch):
    monkeypatch.setenv("FLEET_MAX_CONCURRENT", "5")
    get_settings.cache_clear()
    result = runner.invoke(app, ["config", "set-max-concurrent", "3"], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: not changed: max_concurrent is pinned to 5 by the environment "
        "(FLEET_MAX_CONCURRENT), which wins over the store: unset FLEET_MAX_CONCURRENT where "
        "the runs start, or set it there"
    )
    shown = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
    assert shown["max_concurrent"] == {"value": 5, "source": "environment"}


@pytest.mark.usefixtures("prefect_harness")
def test_a_store_change_a_block_overrides_is_refused_wherever_the_block_is_named(monkeypatch):
    import asyncio

    from prefect.client.orchestration import get_client

    from blocks.fleet_config import FleetConfigBlock

    FleetConfigBlock(max_concurrent=2, review_target="mac5").save("cli-test", overwrite=True)
    monkeypatch.setenv("FLEET_CONFIG_BLOCK", "fleet-config/cli-test")
    get_settings.cache_clear()
    refused = runner.invoke(app, ["config", "set-max-concurrent", "3"], env={"COLUMNS": "400"})
    assert refused.exit_code == 2
    assert "pinned to 2 by the FleetConfig block 'fleet-config/cli-test'" in refused.output
    shown = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
    assert shown["max_concurrent"] == {"value": 2, "source": "block"}
    assert shown["review_target"] == {"value": "mac5", "source": "block"}
    monkeypatch.setenv("FLEET_CONFIG_BLOCK", "fleet-config/no-such-block")
    get_settings.cache_clear()
    missing = runner.invoke(app, ["config", "show"], env={"COLUMNS": "400"})
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "FLEET_CONFIG_BLOCK=fleet-config/no-such-block" in missing.output
    assert "unset FLEET_CONFIG_BLOCK" in missing.output

    # The shell does not name the block, but the deployment's job variables do.
    monkeypatch.delenv("FLEET_CONFIG_BLOCK")
    get_settings.cache_clear()

    async def deploy() -> object:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("fleet-cohort")
            return await client.create_deployment(
                flow_id=flow_id,
                name="cli-config-test",
                job_variables={"env": {"FLEET_CONFIG_BLOCK": "fleet-config/cli-test"}},
            )

    async def undeploy(deployment_id) -> None:
        async with get_client() as client:
            await client.delete_deployment(deployment_id)

    deployment_id = asyncio.run(deploy())
    try:
        refused = runner.invoke(app, ["config", "set-max-concurrent", "3"], env={"COLUMNS": "400"})
        assert refused.exit_code == 2 and "'fleet-config/cli-test'" in refused.output
        table = runner.invoke(app, ["config", "show"], env={"COLUMNS": "400"}).output
        assert "deployment 'cli-config-test''s job variables" in table
    finally:
        asyncio.run(undeploy(deployment_id))
    assert runner.invoke(app, ["config", "set-max-concurrent", "3"]).exit_code == 0


def test_status_cost_sums_the_ledger_per_app_cohort_and_account(monkeypatch):
    from datetime import UTC, datetime

    from fleet.store import open_store
    from fleet.store.base import WorkEntry

    monkeypatch.setenv("FLEET_COHORT_BUDGET_USD", "2")
    get_settings.cache_clear()
    store = open_store(get_settings().resolved_store_url())
    for n, (app_id, account, cost) in enumerate(
        [("app-a", "team-1", 0.5), ("app-a", "team-2", 0.25), ("app-b", "team-1", None)]
    ):
        store.record_work(
            WorkEntry(
                id=f"t{n}",
                app_id=app_id,
                run_id="cohort-42",
                stage="skill",
                task_key=f"skill/{n}/k",
                account=account,
                outcome="answered",
                wall_seconds=10,
                tokens_in=100 if cost else None,
                cost_usd=cost,
                recorded_at=datetime.now(UTC),
            )
        )
    result = runner.invoke(app, ["status", "--cost"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = {line.split("│")[1].strip(): line for line in lines if line.count("│") >= 7}
    assert "0.7500" in row["app-a"] and "200" in row["app-a"]
    assert "0.7500" in row["cohort-42"] and " 3 " in row["cohort-42"]
    assert "0.5000" in row["team-1"] and "0.2500" in row["team-2"]
    assert (
        "open cohort spent $0.7500 of $2.00 (cohort_budget_usd, from environment)" in result.output
    )


@pytest.mark.usefixtures("prefect_harness")
def test_demo_command_end_to_end(tmp_path):
    """README's main command, as a real process (sharing the session's Prefect API for speed)."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "FLEET_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "COLUMNS": "200",
    }
    env.pop("FLEET_STORE_URL", None)
    first = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "protected path changed: ci/protected.cfg" in first.stdout
    for app_id in ("demo-calc", "demo-notes", "demo-weather"):
        assert any(
            app_id in line and "complete" in line and "yes" in line
            for line in first.stdout.splitlines()
        )
    again = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and again.stdout.count("already complete") == 3


def _demo_process(tmp_path, **env_overrides) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "FLEET_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "COLUMNS": "200",
        **env_overrides,
    }
    for name in ("FLEET_STORE_URL", "PREFECT_API_URL"):
        if name not in env_overrides:
            env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_when_the_temporary_prefect_server_cannot_start_says_how_to_fix(tmp_path):
    result = _demo_process(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "temporary Prefect API server did not start" in result.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in result.stderr
    assert "prefect server start" in result.stderr


def test_run_against_an_unreachable_prefect_api_says_so(tmp_path):
    result = _demo_process(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in result.stderr
    assert "prefect server start" in result.stderr and "unset PREFECT_API_URL" in result.stderr


def test_ctrl_c_while_waiting_for_prefect_says_nothing_ran(tmp_path):
    """SIGINT while the API check hangs (a server accepts and never answers): a clear line, 130."""
    import signal
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        env = {
            **os.environ,
            "FLEET_HOME": str(tmp_path / "home"),
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/api",
        }
        env.pop("FLEET_STORE_URL", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "demo"],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            silent.settimeout(60)
            conn, _ = silent.accept()  # the check is now waiting on us
            proc.send_signal(signal.SIGINT)
            out, errs = proc.communicate(timeout=60)
            conn.close()
        finally:
            proc.kill()
    assert proc.returncode == 130, out + errs
    assert "interrupted before any app started" in errs and "Traceback" not in out + errs


@pytest.mark.parametrize("command", ["demo", "run"])
def test_a_cohort_of_zero_is_refused_before_anything_runs(command):
    result = runner.invoke(app, [command, "--size", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--size" in result.output and "1" in result.output
