"""The AuraGateway and Hydra dev servers themselves: startup, shutdown, faults, no shell, CLI."""

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
        assert (
            httpx.post(f"{server.url}/spawn", json={"command": "'unterminated"}).status_code == 400
        )
        assert httpx.post(f"{server.url}/dispatch", json={"command": "true"}).status_code == 400
        assert httpx.get(f"{server.url}/tasks/nope").status_code == 404
        assert httpx.get(f"{server.url}/spawn").status_code == 405
        assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_token_is_required_when_set_including_admin():
    with AuraDevServer(token=TOKEN) as server:
        assert httpx.post(f"{server.url}/spawn", json={"command": "true"}).status_code == 401
        assert httpx.post(f"{server.url}/_admin/faults", json={"fail_next": 1}).status_code == 401
        assert (
            httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=AUTH).status_code
            == 200
        )


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
        assert (
            httpx.put(f"{server.url}/_admin/apps/app1", json={"check": "true"}).status_code == 400
        )


def _run_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.devservers", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_runs_a_hydra_server_until_interrupted():
    proc = _run_cli(
        "hydra", "--port", "0", "--passing", "demo-app", env={"FLEET_HYDRA_TOKEN": TOKEN}
    )
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


# --- a clean environment for commands ----------------------------------------------------

CANARIES = {
    "GEMINI_API_KEY": "canary-gemini-key",
    "FLEET_AURA_TOKEN": "canary-aura-token",
    "FLEET_STORE_URL": "postgresql://u:canarypw@db.example/fleet",
}


def _no_canary(text: str) -> None:
    for name, value in CANARIES.items():
        assert name not in text and value not in text
    assert "canarypw" not in text


def test_aura_commands_never_see_the_servers_secrets(monkeypatch):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    with AuraDevServer(env={"CI": "1"}) as server:
        task_id = httpx.post(f"{server.url}/spawn", json={"command": "env"}).json()["task_id"]
        task = server.wait(task_id)
    assert task.status == "done"
    _no_canary(task.output)
    seen = dict(line.split("=", 1) for line in task.output.splitlines() if "=" in line)
    assert seen["CI"] == "1" and seen["PATH"] == os.environ["PATH"]
    assert set(seen) <= {
        "CI",
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TERM",
        "TMPDIR",
        "TZ",
        "PWD",
    } | {n for n in seen if n.startswith("LC_")}


def test_hydra_checks_never_see_the_servers_secrets(monkeypatch, tmp_path):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    with HydraDevServer() as server:
        server.set_check("app1", ["env"])
        body = httpx.get(f"{server.url}/status/app1").json()
    assert body["quality"]["isPassing"] is True and "PATH=" in body["quality"]["output"]
    _no_canary(body["quality"]["output"])


def test_cli_env_flag_passes_names_and_refuses_the_orchestrators_own():
    proc = _run_cli("aura", "--port", "0", "--env", "FLEET_STORE_URL")
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "FLEET_STORE_URL is the orchestrator's own setting" in err
    proc = _run_cli("aura", "--port", "0", "--env", "GITHUB_TOKEN=abc")
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "GITHUB_TOKEN looks like a secret" in err
    proc = _run_cli(
        "aura",
        "--port",
        "0",
        "--env",
        "PASSED",
        "--env",
        "FIXED=1",
        env={**CANARIES, "PASSED": "yes"},
    )
    try:
        url = proc.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        auth = {"Authorization": f"Bearer {CANARIES['FLEET_AURA_TOKEN']}"}  # the server's token
        answer = httpx.post(f"{url}/spawn", json={"command": "env"}, headers=auth).json()
        deadline, task = time.monotonic() + 10, {}
        while task.get("status") != "done":
            assert time.monotonic() < deadline, task
            time.sleep(0.05)
            task = httpx.get(f"{url}/tasks/{answer['task_id']}", headers=auth).json()
    finally:
        proc.send_signal(2)
        proc.wait(timeout=5)
    assert "PASSED=yes" in task["output"] and "FIXED=1" in task["output"]
    _no_canary(task["output"])


# --- Idempotency-Key ---------------------------------------------------------------------


def _key(key: str) -> dict:
    return {"Idempotency-Key": key}


def test_same_idempotency_key_answers_the_same_task_and_runs_once(tmp_path):
    with AuraDevServer(workdir=tmp_path) as server:
        spawn = {"command": "python3 -c \"open('runs', 'a').write('x')\""}
        first = httpx.post(f"{server.url}/spawn", json=spawn, headers=_key("app1:skill:1")).json()
        server.wait(first["task_id"])
        again = httpx.post(f"{server.url}/spawn", json=spawn, headers=_key("app1:skill:1")).json()
        other = httpx.post(f"{server.url}/spawn", json=spawn, headers=_key("app1:skill:2")).json()
        server.wait(other["task_id"])
        assert again == {"task_id": first["task_id"], "replayed": True}
        assert other["task_id"] != first["task_id"]
        assert (tmp_path / "runs").read_text() == "xx"  # key 1 once, key 2 once
        assert len(server.tasks()) == 2


def test_concurrent_retries_with_one_key_start_one_task():
    from concurrent.futures import ThreadPoolExecutor

    with AuraDevServer() as server:

        def spawn(_: int) -> str:
            body = {"command": "true", "target": "mac1", "model": "codex"}
            answer = httpx.post(f"{server.url}/dispatch", json=body, headers=_key("k"))
            return answer.json()["task_id"]

        with ThreadPoolExecutor(8) as pool:
            ids = set(pool.map(spawn, range(16)))
        assert len(ids) == 1 and len(server.tasks()) == 1


def test_a_key_reused_for_other_work_or_malformed_is_refused():
    with AuraDevServer() as server:
        assert (
            httpx.post(
                f"{server.url}/spawn", json={"command": "true"}, headers=_key("k1")
            ).status_code
            == 200
        )
        reused = httpx.post(f"{server.url}/spawn", json={"command": "false"}, headers=_key("k1"))
        assert reused.status_code == 422 and "different request" in reused.json()["error"]
        as_dispatch = httpx.post(
            f"{server.url}/dispatch",
            headers=_key("k1"),
            json={"command": "true", "target": "mac1", "model": "m"},
        )
        assert as_dispatch.status_code == 422
        for bad in ("has space", "x" * 256):
            r = httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=_key(bad))
            assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]
        assert len(server.tasks()) == 1


def test_a_retry_after_a_lost_answer_finds_the_started_task():
    """The retry the key exists for: 503 / malformed JSON after the gateway did the work."""
    with AuraDevServer() as server:
        server.set_faults(fail_next=1, after_effect=True)
        lost = httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=_key("a"))
        assert lost.status_code == 503 and len(server.tasks()) == 1  # started, answer lost
        retry = httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=_key("a"))
        assert retry.json()["task_id"] == server.tasks()[0].task_id

        server.set_faults(malformed_next=1)
        garbled = httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=_key("b"))
        with pytest.raises(ValueError):
            garbled.json()
        retry = httpx.post(f"{server.url}/spawn", json={"command": "true"}, headers=_key("b"))
        assert retry.json()["replayed"] is True and len(server.tasks()) == 2


# --- faults aimed at one route -----------------------------------------------------------


def test_faults_can_hit_only_spawn_dispatch_or_poll():
    with AuraDevServer() as server:
        task_id = httpx.post(f"{server.url}/spawn", json={"command": "true"}).json()["task_id"]
        server.set_faults(fail_next=2, routes="spawn")
        assert httpx.get(f"{server.url}/tasks/{task_id}").status_code == 200  # not spent
        codes = [
            httpx.post(f"{server.url}/spawn", json={"command": "true"}).status_code
            for _ in range(3)
        ]
        assert codes == [503, 503, 200]

        server.set_faults(malformed_next=1, routes="poll")
        assert httpx.post(f"{server.url}/spawn", json={"command": "true"}).status_code == 200
        with pytest.raises(ValueError):
            httpx.get(f"{server.url}/tasks/{task_id}").json()

        server.set_faults(hang_next=1, hang_seconds=30, routes="dispatch")
        body = {"command": "true", "target": "mac1", "model": "m"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/dispatch", json=body, timeout=0.3)
        assert len(server.tasks()) == 3  # the hang came before the work: nothing started
        server.set_faults(hang_next=1, hang_seconds=30, after_effect=True)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/dispatch", json=body, timeout=0.3)
        assert len(server.tasks()) == 4  # after the work: started, answer never came


def test_route_faults_are_validated_over_http():
    with AuraDevServer() as server:
        bad = httpx.post(f"{server.url}/_admin/faults", json={"routes": "spawn,upload"})
        assert bad.status_code == 400 and "spawn,dispatch,poll" in bad.json()["error"]
        assert httpx.post(f"{server.url}/_admin/faults", json={"routes": 3}).status_code == 400
        ok = httpx.post(
            f"{server.url}/_admin/faults",
            json={"routes": "spawn,poll", "after_effect": True, "fail_next": 1},
        )
        assert ok.json()["routes"] == "spawn,poll" and ok.json()["after_effect"] is True
