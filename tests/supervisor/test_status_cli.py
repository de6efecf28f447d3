"""Status endpoint over real HTTP, and the `fleet supervise` commands."""

from __future__ import annotations

import sys

import httpx
import psutil
from typer.testing import CliRunner

from fleet.clock import ManualClock
from fleet.supervisor.cli import supervise_app
from fleet.supervisor.config import ProcessSpec
from fleet.supervisor.procman import ProcessManager
from fleet.supervisor.runner import Supervisor
from fleet.supervisor.status import StatusServer
from tests.supervisor.conftest import fingerprint, git

CRASH = [sys.executable, "-c", "import sys; sys.exit(7)"]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


def test_status_endpoint_reports_supervisor_and_processes(repo, tmp_path):
    clock = ManualClock()
    sup = Supervisor(
        repo,
        [sys.executable, "app.py"],
        protected=["ci/**"],
        patches_dir=tmp_path,
        min_runtime=0.3,
        max_failures=1,
        clock=clock,
    )
    manager = ProcessManager(
        [
            ProcessSpec(name="mcp", command=SLEEPER),
            ProcessSpec(
                name="flaky", command=CRASH, restart="always", intensity={"max_restarts": 0}
            ),
        ],
        clock=clock,
    )
    try:
        manager.tick()
        with StatusServer(sup, manager, port=0, clock=clock) as server:
            clock.advance(90)
            body = httpx.get(f"{server.url}/status", timeout=5).json()
            assert body["state"] == "idle" and body["consecutive_failures"] == 0
            assert body["current_commit"] == git(repo, "rev-parse", "HEAD")
            assert body["uptime_seconds"] == 90 and body["uptime"] == "1m30s"
            mcp = body["processes"]["mcp"]
            assert (
                mcp["state"] == "running"
                and mcp["pid"] == manager.process("mcp").pid
                and mcp["restarts"] == 0
            )
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200

            manager.process("flaky").popen.wait(timeout=10)
            clock.advance(5)
            # flaky crashes with no restarts allowed → gave up; mcp gets a health sample
            manager.tick()
            health = httpx.get(f"{server.url}/healthz", timeout=5)
            assert health.status_code == 503
            assert health.json()["problems"] == [
                "flaky: gave up: 0 restarts in 60 s (limit 0);"
                " last: exited with code 7 after 95.0 s"
            ]
            body = httpx.get(f"{server.url}/supervisor/status", timeout=5).json()
            assert body["state"] == "degraded"
            assert body["processes"]["mcp"]["last_health"]["memory_mb"] > 1

            # One rejected change with max_failures=1: emergency stop shows up in both documents.
            sup.apply_change([sys.executable, "-c", "open('ci/protected.cfg','w').write('off')"])
            body = httpx.get(f"{server.url}/status", timeout=5).json()
            assert body["state"] == "emergency_stop" and body["consecutive_failures"] == 1
            assert body["reason"].startswith("emergency stop: 1 consecutive failures")
            assert body["app"]["last_verdict"]["violations"] == ["ci/protected.cfg (modified)"]
            assert httpx.get(f"{server.url}/nope", timeout=5).status_code == 404
    finally:
        manager.stop_all()


def test_supervisor_status_answers_the_seed_shape(repo, tmp_path):
    clock = ManualClock()
    sup = Supervisor(repo, [sys.executable, "app.py"], patches_dir=tmp_path, clock=clock)
    manager = ProcessManager(
        [
            ProcessSpec(name="dynamic-thinking", command=SLEEPER),
            ProcessSpec(name="openevolve", command=CRASH, restart="never"),
        ],
        clock=clock,
    )
    try:
        manager.tick()
        manager.process("openevolve").popen.wait(timeout=10)
        manager.tick()
        with StatusServer(sup, manager, port=0, clock=clock) as server:
            clock.advance(2 * 3600 + 34 * 60)
            body = httpx.get(f"{server.url}/supervisor/status", timeout=5).json()
            shape = ("status", "current_commit", "consecutive_failures", "uptime", "mcp_servers")
            seed = {k: body[k] for k in shape}
            assert seed == {
                "status": "idle",
                "current_commit": git(repo, "rev-parse", "HEAD"),
                "consecutive_failures": 0,
                "uptime": "2h34m",
                "mcp_servers": {"dynamic-thinking": "healthy", "openevolve": "exited"},
            }
            assert body["processes"]["openevolve"]["last_exit_code"] == 7  # the richer fields stay
    finally:
        manager.stop_all()


def test_cli_guard_accepts_and_rejects(repo, tmp_path):
    runner = CliRunner()
    base = [
        "guard",
        "--repo",
        str(repo),
        "--protect",
        "ci/**",
        "--patches-dir",
        str(tmp_path / "p"),
        "--check",
        f"{sys.executable} -c 'import app_lib'",
    ]
    ok = runner.invoke(
        supervise_app, [*base, "--", sys.executable, "-c", "open('app_lib.py','w').write('X = 1')"]
    )
    assert ok.exit_code == 0, ok.output
    assert "accepted: HEAD " in ok.output
    assert git(repo, "log", "-1", "--format=%s") == "supervisor: accepted change"

    before = fingerprint(repo)
    bad = runner.invoke(
        supervise_app,
        [*base, "--", sys.executable, "-c", "open('ci/protected.cfg','w').write('off')"],
    )
    assert bad.exit_code == 1, bad.output
    assert "rejected: protected path changed: ci/protected.cfg (modified)" in bad.output
    assert "patch kept at " in bad.output and fingerprint(repo) == before

    broken = runner.invoke(
        supervise_app, ["guard", "--repo", str(tmp_path / "nowhere"), "--", "true"]
    )
    assert (
        broken.exit_code == 2
        and "cannot guard:" in broken.output
        and "Traceback" not in broken.output
    )


def test_cli_check_config(tmp_path):
    runner = CliRunner()
    good = tmp_path / "supervisor.yaml"
    good.write_text("processes:\n  - {name: mcp, command: [python3, s.py]}\n")
    result = runner.invoke(supervise_app, ["check-config", str(good)])
    assert result.exit_code == 0 and f"OK {good}: 1 process(es)" in result.output

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "processes:\n  - name: mcp\n    command: [python3, s.py]\n    restart: sometimes\n"
    )
    result = runner.invoke(supervise_app, ["check-config", str(bad)])
    assert result.exit_code == 2
    assert (
        f"{bad}:4: processes[0].restart: 'sometimes' is not one of always, on-failure, never"
        in result.output
    )
    assert "Traceback" not in result.output


def test_cli_run_starts_processes_and_stops_them_cleanly(tmp_path, tmp_home):
    pid_file = tmp_path / "pid"
    config = tmp_path / "supervisor.yaml"
    config.write_text(
        "status_port: 0\n"
        "processes:\n"
        "  - name: helper\n"
        f'    command: [{sys.executable}, -c, "import os, time;'
        f" open('{pid_file}', 'w').write(str(os.getpid())); time.sleep(30)\"]\n"
    )
    result = CliRunner().invoke(
        supervise_app, ["run", "--config", str(config), "--for", "1", "--interval", "0.05"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "status: http://127.0.0.1:" in result.output
        and "stopped by the supervisor" in result.output
    )
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (tmp_home / "supervisor" / "logs").is_dir()


def test_cli_run_supervises_the_app_of_the_config(repo, tmp_path, tmp_home):
    config = tmp_path / "supervisor.yaml"
    config.write_text(
        "status_port: 0\n"
        "app:\n"
        f"  repo: {repo}\n"
        f"  command: [{sys.executable}, app.py]\n"
        "  protected: ['ci/**']\n"
        "  min_runtime_seconds: 0.2\n"
    )
    result = CliRunner().invoke(
        supervise_app, ["run", "--config", str(config), "--for", "0.6", "--interval", "0.05"]
    )
    assert result.exit_code == 0, result.output
    log = (tmp_home / "supervisor" / "logs" / "app.log").read_text()
    assert (
        "app up" in log
    )  # the app ran, and was stopped with the supervisor (no process left behind)
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] == [sys.executable, "app.py"]
    ]


def test_the_status_server_serves_prometheus_metrics(repo, tmp_path):
    """GET /metrics: the supervisor's own figures, plus what an injected source renders (the
    mesh's, when the supervisor can reach the store)."""
    from fleet.metrics import samples

    clock = ManualClock()
    sup = Supervisor(repo, [sys.executable, "app.py"], patches_dir=tmp_path, clock=clock)
    manager = ProcessManager(
        [
            ProcessSpec(name="mcp", command=SLEEPER),
            ProcessSpec(name="gone", command=CRASH, restart="never"),
        ],
        clock=clock,
    )
    extra = b'# TYPE fleet_mesh_queue_depth gauge\nfleet_mesh_queue_depth{status="queued"} 3.0\n'
    try:
        manager.tick()
        manager.process("gone").popen.wait(timeout=10)
        manager.tick()
        with StatusServer(sup, manager, port=0, clock=clock, metrics=lambda: extra) as server:
            clock.advance(90)
            reply = httpx.get(f"{server.url}/metrics", timeout=5)
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
            found = {
                (name, tuple(sorted(labels.items()))): v for name, labels, v in samples(reply.text)
            }
            assert found[("fleet_supervisor_uptime_seconds", ())] == 90
            assert found[("fleet_supervisor_consecutive_failures", ())] == 0
            assert found[("fleet_supervisor_healthy", ())] == 1
            assert found[("fleet_supervisor_processes", (("state", "running"),))] == 1
            assert found[("fleet_supervisor_processes", (("state", "exited"),))] == 1
            assert found[("fleet_mesh_queue_depth", (("status", "queued"),))] == 3
    finally:
        manager.stop_all()


def test_the_supervisors_metrics_carry_the_mesh_figures_from_its_store(tmp_home):
    """`fleet supervise run` mounts the mesh's figures (read from the mesh's store at each
    scrape) beside its own on GET /metrics."""
    from fleet.metrics import samples
    from fleet.supervisor.cli import _mesh_metrics

    names = {name for name, _, _ in samples(_mesh_metrics()().decode())}
    assert {"fleet_mesh_queue_depth", "fleet_mesh_machines"} <= names, names
