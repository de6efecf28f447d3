"""The AuraGateway and Hydra dev servers themselves: startup, shutdown, faults, no shell, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from fleet.devservers import AuraDevServer, HydraDevServer

TOKEN = "dev-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_starts_fast_and_stops_cleanly():
    began = time.perf_counter()
    server = AuraDevServer().start()
    started = time.perf_counter() - began
    url = server.url
    assert httpx.get(f"{url}/healthz").json() == {"ok": True}
    began = time.perf_counter()
    server.stop()
    stopped = time.perf_counter() - began
    assert started < 0.5 and stopped < 1.0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")


def test_stop_releases_hanging_requests_and_kills_running_commands(tmp_path):
    server = AuraDevServer().start()
    task_id = httpx.post(f"{server.url}/spawn", json={"command": "sleep 30"}).json()["task_id"]
    deadline = time.monotonic() + 5
    while server.task(task_id).proc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = server.task(task_id).proc.pid
    server.set_faults(hang_next=1, hang_seconds=30)
    began = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{server.url}/healthz", timeout=0.2)
    server.stop()
    assert time.perf_counter() - began < 2
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_commands_are_split_not_shelled(tmp_path):
    with AuraDevServer(workdir=tmp_path) as server:
        answer = httpx.post(f"{server.url}/spawn", json={"command": "echo $HOME; touch pwned"})
        task = server.wait(answer.json()["task_id"])
    assert task.status == "done"
    assert task.output == "$HOME; touch pwned\n"  # echo got the words; no shell expanded them
    assert not (tmp_path / "pwned").exists()


def test_task_timeout_kills_the_command():
    with AuraDevServer(task_timeout=0.2) as server:
        task_id = httpx.post(f"{server.url}/spawn", json={"command": "sleep 30"}).json()["task_id"]
        task = server.wait(task_id, timeout=5)
    assert task.status == "failed" and "timed out after 0.2 s" in (task.error or "")


def test_bad_requests_are_400_and_unknown_paths_404():
    with AuraDevServer() as server:
        assert httpx.post(f"{server.url}/spawn", json={"cmd": "x"}).status_code == 400
        assert httpx.post(f"{server.url}/spawn", json={"command": "'unterminated"}).status_code == 400
        assert httpx.post(f"{server.url}/dispatch", json={"command": "true"}).status_code == 400
        assert httpx.get(f"{server.url}/tasks/nope").status_code == 404
        assert httpx.get(f"{server.url}/spawn").status_code == 405
        assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_token_is_required_when_set_including_admin():
    with AuraDevServer(token=TOKEN) as server:
        assert httpx.post(f"{server.url}/spawn", json={"command": "true"}).status_code == 401
        assert httpx.post(f"{server.url}/_admin/faults", json={"fail_next": 1}).status_code == 401
        assert httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=AUTH).status_code == 200


def test_admin_endpoint_sets_faults_and_is_exempt_from_them():
    with HydraDevServer() as server:
        server.set_status("app1")
        r = httpx.post(f"{server.url}/_admin/faults", json={"fail_next": 2, "fail_status": 504})
        assert r.json()["fail_next"] == 2
        assert httpx.get(f"{server.url}/_admin/faults").json()["fail_next"] == 2  # not spent
        codes = [httpx.get(f"{server.url}/status/app1").status_code for _ in range(3)]
        assert codes == [504, 504, 200]
        bad = httpx.post(f"{server.url}/_admin/faults", json={"explode": True})
        assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]
        assert httpx.post(f"{server.url}/_admin/faults", json={"fail_next": -1}).status_code == 400


def test_malformed_and_latency_faults():
    with HydraDevServer() as server:
        server.set_status("app1")
        server.set_faults(malformed_next=1, latency=0.1)
        began = time.perf_counter()
        r = httpx.get(f"{server.url}/status/app1")
        assert time.perf_counter() - began >= 0.1
        with pytest.raises(ValueError):
            r.json()
        assert httpx.get(f"{server.url}/status/app1").json()["phase"] == "evolving"


def test_hydra_admin_sets_a_check_command(tmp_path):
    with HydraDevServer() as server:
        r = httpx.put(f"{server.url}/_admin/apps/app1", json={"check": ["true"]})
        assert r.status_code == 200
        body = httpx.get(f"{server.url}/status/app1").json()
        assert body["quality"]["isPassing"] is True and body["cycle"] == 1
        assert httpx.put(f"{server.url}/_admin/apps/app1", json={"check": "true"}).status_code == 400


def _run_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.devservers", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_runs_a_hydra_server_until_interrupted():
    proc = _run_cli("hydra", "--port", "0", "--passing", "demo-app", env={"FLEET_HYDRA_TOKEN": TOKEN})
    try:
        line = proc.stdout.readline()
        assert "hydra dev server on http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        assert "token required" in line
        body = httpx.get(f"{url}/status/demo-app", headers=AUTH).json()
        assert body["quality"]["isPassing"] is True
    finally:
        proc.send_signal(2)  # Ctrl-C
        assert proc.wait(timeout=5) == 0


def test_cli_refuses_a_public_address_without_allow_remote():
    proc = _run_cli("aura", "--host", "0.0.0.0", "--port", "0")
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "--allow-remote" in err
