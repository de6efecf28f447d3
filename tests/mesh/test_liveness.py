"""Truthful liveness against real HTTP endpoints on 127.0.0.1 and real stores, on a ManualClock."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from fleet.clock import ManualClock
from fleet.mesh.liveness import LivenessProbe, Reach, ReachabilityCheck, classify_error
from fleet.mesh.pg_store import PgMeshStore
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.settings import FleetSettings
from tests.mesh.conftest import truncate_mesh

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = FleetSettings()
MISSED = 2 * S.heartbeat_seconds + 1  # just past two heartbeat periods


class HealthServer:
    """A node agent's health endpoint: answers 200 after `delay` seconds until stopped; over
    https with `tls` (a server-side SSLContext)."""

    def __init__(self, delay: float = 0.0, tls: ssl.SSLContext | None = None):
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                time.sleep(delay)
                body = b'{"status": "ok"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}/health"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:  # the process is gone: its port is closed
        self._server.shutdown()
        self._server.server_close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/health"


@pytest.fixture
def agent_process(tmp_path):
    """A real process serving HTTP on 127.0.0.1 (any answer, even 404, means alive); kill -9 it."""
    port = int(closed_port_url().rsplit(":", 1)[1].split("/")[0])
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url, timeout=0.5)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the stand-in agent process did not start serving within 10 s")
            time.sleep(0.05)

    def kill9() -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    proc.url, proc.kill9 = url, kill9
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def servers():
    started: list[HealthServer] = []

    def start(delay: float = 0.0) -> HealthServer:
        started.append(HealthServer(delay))
        return started[-1]

    yield start
    for s in started:
        with contextlib.suppress(Exception):
            s.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """(store factory, lock_out()) for one fresh mesh database; lock_out() holds a write lock
    on the machines table from another connection until the returned callable releases it."""
    opened = []
    if request.param == "sqlite":
        path = tmp_path / "mesh.db"

        def factory(**kw):
            opened.append(SQLiteMeshStore(path, busy_timeout_seconds=kw.get("lock_timeout", 30)))
            return opened[-1]

        def lock_out():
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            return lambda: (conn.execute("ROLLBACK"), conn.close())
    else:
        import psycopg

        url = request.getfixturevalue("mesh_pg_url")
        truncate_mesh(url)

        def factory(**kw):
            opened.append(PgMeshStore(url, lock_timeout_seconds=kw.get("lock_timeout", 10)))
            return opened[-1]

        def lock_out():
            conn = psycopg.connect(url)
            conn.execute("LOCK TABLE mesh_health IN EXCLUSIVE MODE")  # reads pass, writes wait
            return lambda: (conn.rollback(), conn.close())

    yield factory, lock_out
    for s in opened:
        s.close()


def ident(machine_id: str) -> MachineIdentity:
    return MachineIdentity(machine_id=machine_id, mesh_id="mesh-test")


def probe_for(
    store, reference_url: str | None, timeout: float = 1.0, clock=None, spacing: float = 0
) -> LivenessProbe:
    """A probe as configured, but by default one confirmation a round (spacing 0), so a test
    can act between the two; pass `clock` and the spacing to take both in one round."""
    return LivenessProbe.from_settings(
        store,
        S,
        reference_url=reference_url,
        timeout_seconds=timeout,
        confirm_spacing_seconds=spacing,
        clock=clock or ManualClock(T0),
    )


def start_machine_with_work(store, clock, servers, n_tasks: int = 3):
    agent = servers()
    store.heartbeat(ident("mac1"), clock.now(), agent.url, [])
    for i in range(n_tasks):
        store.enqueue("skill", ["claude", str(i)], clock.now(), task_id=f"w{i}")
    claimed = store.claim("mac1", clock.now(), limit=n_tasks)
    assert len(claimed) == n_tasks
    return agent


def test_a_killed_machine_is_declared_down_after_two_confirmations_and_its_work_moves(
    backend, servers, agent_process
):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    reference = servers()
    store.heartbeat(ident("mac1"), clock.now(), agent_process.url, [])
    for i in range(3):
        store.enqueue("skill", ["claude", str(i)], clock.now(), task_id=f"w{i}")
    assert len(store.claim("mac1", clock.now(), limit=3)) == 3
    store.heartbeat(ident("mac3"), clock.now(), servers().url, [])
    probe = probe_for(store, reference.url)
    # Alive while it answers, even late and even with a 404.
    assert probe.confirm(clock.advance(MISSED)).checked[0].outcome == "alive"

    # kill -9: no more heartbeats, and nothing listens on its port any more.
    agent_process.kill9()
    clock.advance(MISSED)
    store.heartbeat(ident("mac3"), clock.now(), None, [])  # mac3 stays healthy
    first = probe.confirm(clock.now())
    assert first.self_check == "ok"
    assert [(v.machine_id, v.outcome, v.failed_confirmations) for v in first.checked] == [
        ("mac1", "failed", 1)
    ]
    assert {t.task_id for t in store.tasks_of("mac1")} == {
        "w0",
        "w1",
        "w2",
    }  # one miss proves nothing

    clock.advance(S.heartbeat_seconds)
    store.heartbeat(ident("mac3"), clock.now(), None, [])
    second = probe.confirm(clock.now())
    assert second.declared_down == ["mac1"] and second.requeued == 3
    assert store.tasks_of("mac1") == []
    [mac1] = [m for m in store.machines() if m.machine_id == "mac1"]
    assert mac1.status == "down"

    # Another machine picks the work up; the dead one is not routed to.
    assert store.claim("mac1", clock.now(), limit=10) == []
    taken = store.claim("mac3", clock.now(), limit=10)
    assert sorted(t.task_id for t in taken) == ["w0", "w1", "w2"]
    assert all(t.attempts == 1 for t in taken)
    assert [e.event for e in store.events(event="MachineDown")] == ["MachineDown"]

    # A further round does not judge it again, and it gets no work until it heartbeats.
    assert probe.confirm(clock.advance(S.heartbeat_seconds)).checked == []
    store.enqueue("skill", ["again"], clock.now(), task_id="later")
    assert store.claim("mac1", clock.now()) == []
    # Its own heartbeat brings it back.
    store.heartbeat(ident("mac1"), clock.advance(1), agent_process.url, [])
    assert [t.task_id for t in store.claim("mac1", clock.now())] == ["later"]
    probe.close()


def test_one_round_takes_both_confirmations_spacing_apart_on_the_injected_clock(
    backend, servers, agent_process
):
    """As configured: missed after 1.5 periods, both failed probes in one round 5 s apart, so a
    machine killed right after its heartbeat is down within two heartbeats of dying."""
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), agent_process.url, [])
    store.enqueue("skill", ["claude", "x"], clock.now(), task_id="w0")
    assert len(store.claim("mac1", clock.now())) == 1
    reference = servers()
    probe = probe_for(store, reference.url, clock=clock, spacing=S.liveness_confirm_spacing_seconds)
    agent_process.kill9()
    died = clock.now()
    # 1.5 periods: not yet missed, nobody is probed.
    assert probe.confirm(clock.advance(1.5 * S.heartbeat_seconds)).self_check == "not_needed"
    report = probe.confirm(clock.advance(1))
    assert report.declared_down == ["mac1"] and report.requeued == 1
    assert clock.sleeps == [S.liveness_confirm_spacing_seconds]  # the pause between the two
    [verdict] = report.checked
    assert (verdict.outcome, verdict.failed_confirmations) == ("declared_down", 2)
    assert (clock.now() - died).total_seconds() <= 2 * S.heartbeat_seconds
    [event] = store.events(event="MachineDown")
    assert event.machine_id == "mac1"
    probe.close()


def test_a_machine_that_answers_the_second_probe_of_a_round_is_not_down(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), "http://mac1.invalid/health", [])
    answers = [Reach.UNREACHABLE, Reach.REACHABLE]
    probe = LivenessProbe.from_settings(store, S, check=lambda url: answers.pop(0), clock=clock)
    report = probe.confirm(clock.advance(2 * S.heartbeat_seconds))
    assert report.declared_down == [] and answers == []
    assert [(v.outcome, v.failed_confirmations) for v in report.checked] == [("alive", 0)]
    [mac1] = store.machines()
    assert (mac1.status, mac1.failed_confirmations) == ("alive", 0)


def test_a_store_error_during_confirmation_leaves_the_count_unchanged(backend, servers):
    factory, lock_out = backend
    store = factory(lock_timeout=0.2)
    clock = ManualClock(T0)
    reference = servers()
    agent = start_machine_with_work(store, clock, servers)
    probe = probe_for(store, reference.url)
    agent.stop()

    assert probe.confirm(clock.advance(MISSED)).checked[0].failed_confirmations == 1
    release = lock_out()
    try:
        during = probe.confirm(clock.advance(S.heartbeat_seconds))
    finally:
        release()
    assert [v.outcome for v in during.checked] == ["store_error"]
    assert during.declared_down == [] and during.errors
    [mac1] = store.machines()
    assert (mac1.status, mac1.failed_confirmations) == ("suspect", 1)
    assert len(store.tasks_of("mac1")) == 3

    # Once the store answers again, the next genuine failure is the second confirmation.
    after = probe.confirm(clock.advance(S.heartbeat_seconds))
    assert after.declared_down == ["mac1"]
    probe.close()


def test_an_unreadable_store_records_nothing(tmp_path):
    broken = PgMeshStore("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_seconds=1)
    report = LivenessProbe.from_settings(broken, S).confirm(T0)
    assert report.self_check == "store_error" and report.checked == []
    assert "127.0.0.1:1/nowhere" in report.errors[0]


def test_our_own_network_failing_is_never_evidence(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    agent = start_machine_with_work(store, clock, servers)
    agent.stop()
    probe = probe_for(store, closed_port_url())  # the known-good reference is unreachable
    for _ in range(5):
        report = probe.confirm(clock.advance(MISSED))
        assert report.self_check == "reference_unreachable" and report.checked == []
    [mac1] = store.machines()
    assert (mac1.status, mac1.failed_confirmations) == ("alive", 0)
    assert len(store.tasks_of("mac1")) == 3
    probe.close()


def test_a_slow_but_alive_machine_is_never_declared_dead(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    slow = servers(delay=0.15)
    store.heartbeat(ident("mac1"), clock.now(), slow.url, [])
    store.enqueue("hydra", ["hydra"], clock.now(), task_id="long")
    store.claim("mac1", clock.now())
    probe = probe_for(store, servers().url, timeout=2.0)
    for _ in range(4):  # its heartbeats are late, but its endpoint answers
        report = probe.confirm(clock.advance(MISSED))
        assert [(v.outcome, v.failed_confirmations) for v in report.checked] == [("alive", 0)]
    assert slow.hits == 4
    [mac1] = store.machines()
    assert (mac1.status, mac1.failed_confirmations) == ("alive", 0)
    assert [t.task_id for t in store.tasks_of("mac1")] == ["long"]
    probe.close()


def test_a_success_between_failures_restarts_the_count(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    agent = servers()
    store.heartbeat(ident("mac1"), clock.now(), agent.url, [])
    outcomes = []

    def check(url: str) -> Reach:
        return outcomes.pop(0)

    probe = LivenessProbe.from_settings(store, S, check=check, confirm_spacing_seconds=0)
    for reach in (Reach.UNREACHABLE, Reach.REACHABLE, Reach.UNREACHABLE, Reach.INCONCLUSIVE):
        outcomes.append(reach)
        probe.confirm(clock.advance(MISSED))
    [mac1] = store.machines()
    assert (mac1.status, mac1.failed_confirmations) == ("suspect", 1)


def test_a_heartbeat_arriving_during_the_probe_wins(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), closed_port_url(), [])
    stale_before = clock.advance(MISSED) - timedelta(seconds=2 * S.heartbeat_seconds)
    store.record_confirmation("mac1", True, clock.now(), stale_before=stale_before)
    store.heartbeat(ident("mac1"), clock.now(), None, [])  # it was only late
    assert store.mark_down("mac1", clock.now(), stale_before=stale_before, max_attempts=3) == -1
    [mac1] = store.machines()
    assert (mac1.status, mac1.failed_confirmations) == ("alive", 0)


def test_a_machine_without_a_health_url_is_never_declared_dead(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    store.heartbeat(ident("mac1"), clock.now(), None, [])
    probe = probe_for(store, servers().url)
    for _ in range(3):
        assert [v.outcome for v in probe.confirm(clock.advance(MISSED)).checked] == ["inconclusive"]
    assert store.machines()[0].status == "alive"
    probe.close()


# The reachability check itself ---------------------------------------------------------
def test_reachability_on_real_sockets(servers):
    check = ReachabilityCheck(timeout_seconds=0.3)
    assert check(servers().url) is Reach.REACHABLE
    assert check(closed_port_url()) is Reach.UNREACHABLE
    # Accepts the connection but never answers: a hung agent.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(1)
    try:
        assert check(f"http://127.0.0.1:{hung.getsockname()[1]}/health") is Reach.UNREACHABLE
    finally:
        hung.close()
    check.close()


def test_errors_of_our_own_side_are_inconclusive():
    def wrapped(cause: BaseException) -> httpx.ConnectError:
        exc = httpx.ConnectError("connect failed")
        exc.__cause__ = cause
        return exc

    assert (
        classify_error(wrapped(socket.gaierror(-3, "Temporary failure in name resolution")))
        is Reach.INCONCLUSIVE
    )
    assert classify_error(wrapped(OSError(101, "Network is unreachable"))) is Reach.INCONCLUSIVE
    assert classify_error(wrapped(ConnectionRefusedError(111, "refused"))) is Reach.UNREACHABLE
    assert classify_error(wrapped(OSError(113, "No route to host"))) is Reach.UNREACHABLE
    assert classify_error(httpx.PoolTimeout("pool")) is Reach.INCONCLUSIVE
    assert classify_error(httpx.UnsupportedProtocol("bad url")) is Reach.INCONCLUSIVE
    assert classify_error(RuntimeError("a bug of ours")) is Reach.INCONCLUSIVE


def test_without_a_configured_reference_healthy_peers_vouch_for_our_network(backend, servers):
    factory, _ = backend
    store = factory()
    clock = ManualClock(T0)
    agent = start_machine_with_work(store, clock, servers)
    peer = servers()
    agent.stop()
    probe = probe_for(store, None)

    clock.advance(MISSED)
    store.heartbeat(ident("mac3"), clock.now(), peer.url, [])
    report = probe.confirm(clock.now())
    assert report.self_check == "ok" and peer.hits == 1
    assert [(v.machine_id, v.outcome) for v in report.checked] == [("mac1", "failed")]

    # The peer heartbeats but its endpoint no longer answers us either: the fault may be
    # ours, so nothing is recorded.
    peer.stop()
    clock.advance(S.heartbeat_seconds)
    store.heartbeat(ident("mac3"), clock.now(), peer.url, [])
    assert probe.confirm(clock.now()).self_check == "reference_unreachable"
    mac1 = next(m for m in store.machines() if m.machine_id == "mac1")
    assert (mac1.status, mac1.failed_confirmations) == ("suspect", 1)
    probe.close()
