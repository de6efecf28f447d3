"""Chaos injection against a running local system (seed 003): each fault starts, lasts its
time, and is reverted — even when the wait is interrupted.

  kill-pane       kill a node agent's tmux pane (the agent makes a new one: nothing to revert)
  kill-agent      SIGKILL the node agent process (its supervisor restarts it)
  drop-machine    SIGSTOP the node agent (heartbeats stop, its health endpoint hangs), SIGCONT after
  gateway-errors  the local dev gateway answers 503 to everything, until reverted
  store-outage    the mesh store is locked (SQLite: an exclusive transaction; PostgreSQL:
                  ACCESS EXCLUSIVE on the mesh tables) until reverted
  cpu-spike       one busy process per core until reverted
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import ConfigError

FAULTS = ("kill-pane", "kill-agent", "drop-machine", "gateway-errors", "store-outage", "cpu-spike")
_MESH_TABLES = "mesh_task_queue, mesh_health, mesh_task_events, mesh_pane_state"


def parse_duration(text: str) -> float:
    """`60s`, `5m`, `1h` or plain seconds → seconds (one clear error otherwise)."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"duration {text!r} is not like 60s, 5m or 1h")
    return value


@dataclass
class Fault:
    """A started fault and how to undo it."""

    kind: str
    target: str
    revert_fn: Callable[[], object] | None = None  # what it returns is ignored
    detail: dict[str, Any] = field(default_factory=dict)
    reverted: bool = False

    def revert(self) -> None:
        if not self.reverted and self.revert_fn is not None:
            self.revert_fn()
        self.reverted = True


def _spin() -> None:  # pragma: no cover - runs in the child processes
    while True:
        pass


def cpu_spike(cores: int | None = None) -> Fault:
    procs = [
        multiprocessing.Process(target=_spin, daemon=True)
        for _ in range(cores or os.cpu_count() or 1)
    ]
    for p in procs:
        p.start()

    def revert() -> None:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)

    return Fault("cpu-spike", f"{len(procs)} core(s)", revert, {"pids": [p.pid for p in procs]})


def _pid(target: str) -> int:
    try:
        return int(target)
    except ValueError:
        raise ConfigError(f"--target {target!r} must be the node agent's process id") from None


def drop_machine(pid: str) -> Fault:
    n = _pid(pid)
    os.kill(n, signal.SIGSTOP)
    return Fault("drop-machine", pid, lambda: _signal(n, signal.SIGCONT))


def kill_agent(pid: str) -> Fault:
    os.kill(_pid(pid), signal.SIGKILL)
    return Fault("kill-agent", pid)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile: nothing left to revert
        os.kill(pid, sig)


def kill_pane(pane: str, socket_name: str = "fleet") -> Fault:
    import libtmux

    libtmux.Server(socket_name=socket_name).cmd("kill-pane", "-t", pane)
    return Fault("kill-pane", pane)


def gateway_errors(url: str, token: str | None = None) -> Fault:
    """The dev gateway's admin faults (fleet/devservers): every request gets 503 until reverted."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    admin = url.rstrip("/") + "/_admin/faults"
    httpx.post(
        admin, json={"fail_next": 10**9, "fail_status": 503}, headers=headers, timeout=5
    ).raise_for_status()
    return Fault(
        "gateway-errors",
        url,
        lambda: httpx.post(
            admin, json={"fail_next": 0}, headers=headers, timeout=5
        ).raise_for_status(),
    )


def store_outage(url: str) -> Fault:
    """Hold the mesh store locked: writers and (PostgreSQL) readers fail with StoreUnavailable."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")

        def revert_sqlite() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        return Fault("store-outage", "sqlite", revert_sqlite)
    if url.startswith(("postgresql://", "postgres://")):
        import psycopg

        pg = psycopg.connect(url, autocommit=False)
        pg.execute(f"LOCK TABLE {_MESH_TABLES} IN ACCESS EXCLUSIVE MODE")

        def revert_pg() -> None:
            pg.rollback()
            pg.close()

        return Fault("store-outage", "postgresql", revert_pg)
    raise ConfigError(
        f"store-outage needs a sqlite:/// or postgresql:// store URL, not {url.split(':')[0]!r}"
    )


def inject(
    kind: str,
    *,
    target: str = "",
    store_url: str = "",
    gateway_url: str = "",
    tmux_socket: str = "fleet",
) -> Fault:
    """Start one fault; `revert()` undoes it."""
    if kind == "cpu-spike":
        return cpu_spike(int(target) if target else None)
    if kind == "drop-machine":
        return drop_machine(target)
    if kind == "kill-agent":
        return kill_agent(target)
    if kind == "kill-pane":
        if not target:
            raise ConfigError("kill-pane needs --target PANE (e.g. %3; see `fleet agent status`)")
        return kill_pane(target, tmux_socket)
    if kind == "gateway-errors":
        if not gateway_url:
            raise ConfigError(
                "gateway-errors needs the dev gateway URL (--gateway-url or FLEET_AURA_URL)"
            )
        return gateway_errors(gateway_url)
    if kind == "store-outage":
        return store_outage(store_url)
    raise ConfigError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")


def run(fault: Fault, seconds: float, sleep: Callable[[float], None] = time.sleep) -> Fault:
    """Let the fault last `seconds`, then revert it (also on Ctrl-C or an error)."""
    try:
        sleep(seconds)
    finally:
        fault.revert()
    return fault
