"""An AuraGateway-compatible dev server that really runs the commands it gets (argv, no shell)."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.agentenv import agent_env
from fleet.devservers.base import DevServer, Faults, Reply
from fleet.jsonhttp import Request, Response
from fleet.procs import kill_group

log = logging.getLogger("fleet.devservers.aura")

TAIL = 4000
ROUTES = ("spawn", "dispatch", "poll")
IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces, as Stripe's keys


@dataclass
class AuraFaults(Faults):
    stall_next_tasks: int = 0  # the next N tasks stay "running" forever (their command never runs)
    # Comma-separated subset of spawn,dispatch,poll: the counted faults (fail_next, hang_next,
    # malformed_next) hit only those routes' requests. Empty: every request, as before.
    routes: str = ""
    # fail/hang on spawn and dispatch come after the task has started: the gateway did the
    # work and the answer is lost (malformed answers always come after the work).
    after_effect: bool = False

    def update(self, values: dict[str, Any]) -> None:
        values = dict(values)
        routes = values.pop("routes", None)
        if routes is not None:
            names = [r for r in routes.split(",") if r] if isinstance(routes, str) else None
            if names is None or not set(names) <= set(ROUTES):
                raise ValueError(
                    f"fault routes takes a comma-separated subset of "
                    f"{','.join(ROUTES)}, got {routes!r}"
                )
        super().update(values)
        if routes is not None:
            self.routes = routes

    def hits(self, route: str) -> bool:
        return not self.routes or route in self.routes.split(",")


def _route_of(path: str) -> str:
    if path == "/spawn":
        return "spawn"
    if path == "/dispatch":
        return "dispatch"
    return "poll" if path.startswith("/tasks/") else "other"


@dataclass
class GatewayTask:
    task_id: str
    argv: list[str]
    target: str | None = None
    model: str | None = None
    status: str = "queued"
    output: str = ""
    error: str | None = None
    exit_code: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "status": self.status,
            "output": self.output,
            "error": self.error,
            "exit_code": self.exit_code,
            "target": self.target,
            "model": self.model,
            "command": shlex.join(self.argv),
        }


class AuraDevServer(DevServer):
    """`POST /spawn {command}`, `POST /dispatch {command, target, model}` → `{task_id}`;
    `GET /tasks/{id}` → `{status, output, error}`.

    The command string is split with shlex and run as an argument list — never through a
    shell — in `workdir`, at most `max_parallel` at a time (the rest wait as "queued"), with
    the agent allowlist environment plus `env` (fleet/agentenv.py), never this process's own.
    `dispatch` records target and model and runs the command here: there is one machine.

    An `Idempotency-Key` header on spawn/dispatch makes a retry safe: the same key with the
    same request answers the first task's id (and `"replayed": true`) without running the
    command again; the same key with a different request is refused (422). Keys live as
    long as the server (a real gateway keeps them at least as long as its tasks).
    """

    name = "aura"
    faults_class = AuraFaults
    faults: AuraFaults

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        workdir: str | Path | None = None,
        task_timeout: float | None = None,
        max_parallel: int = 4,
        env: dict[str, str] | None = None,
    ):
        super().__init__(host, port, token)
        self.workdir = Path(workdir) if workdir else None
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.task_timeout = task_timeout
        self.env = env
        self._slots = threading.BoundedSemaphore(max_parallel)
        self._tasks: dict[str, GatewayTask] = {}
        self._by_key: dict[str, tuple[tuple, str]] = {}  # key → (request, task id)
        self._lock = threading.Lock()
        # Routes see (params, body): the request's path, its Idempotency-Key and a fault
        # held back until after the effect reach them through this per-thread record.
        self._request = threading.local()
        self.route("POST", r"/spawn", lambda p, b: self._start(b, dispatch=False))
        self.route("POST", r"/dispatch", lambda p, b: self._start(b, dispatch=True))
        self.route("GET", r"/tasks/(?P<task_id>[^/]+)", self._get_task)

    # -- Python API --------------------------------------------------------------------------

    def task(self, task_id: str) -> GatewayTask:
        with self._lock:
            return self._tasks[task_id]

    def tasks(self) -> list[GatewayTask]:
        with self._lock:
            return list(self._tasks.values())

    def wait(self, task_id: str, timeout: float = 10) -> GatewayTask:
        """Block until the task is done or failed (for tests driving the server directly)."""
        task = self.task(task_id)
        if not task.finished.wait(timeout):
            raise TimeoutError(
                f"aura dev server: task {task_id} still {task.status} after {timeout:g} s"
            )
        return task

    def stop(self) -> None:
        super().stop()
        killed = []
        for task in self.tasks():
            if task.proc is not None and task.proc.poll() is None:
                kill_group(task.proc.pid)
                killed.append(task)
        for task in killed:  # their runner threads reap them; wait so none outlives stop()
            task.finished.wait(5)

    # -- faults and headers ------------------------------------------------------------------

    def _handle(self, request: Request) -> Response | None:
        self._request.path = request.path
        self._request.key = request.headers.get(IDEMPOTENCY_HEADER)
        self._request.after = None
        try:
            return super()._handle(request)
        finally:
            self._request.__dict__.clear()

    def _take_fault(self) -> str | None:
        route = _route_of(getattr(self._request, "path", ""))
        with self._faults_lock:
            targeted = self.faults.hits(route)
            after_effect = self.faults.after_effect and route in ("spawn", "dispatch")
        if not targeted:
            with self._faults_lock:
                return "auth" if self.faults.reject_auth else None
        fault = super()._take_fault()
        if fault in ("fail", "hang") and after_effect:
            self._request.after = fault  # _start answers with it once the task has started
            return None
        return fault

    def _answer_after_effect(self, task_id: str) -> None:
        fault = getattr(self._request, "after", None)
        if fault == "hang":
            self._stopping.wait(self.faults.hang_seconds)
            raise Reply(504, {"error": "injected hang (the task was started)"})
        if fault == "fail":
            raise Reply(
                self.faults.fail_status, {"error": "injected failure (the task was started)"}
            )

    # -- routes ------------------------------------------------------------------------------

    def _start(self, body: Any, *, dispatch: bool) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("command"), str):
            raise Reply(400, {"error": 'body must be {"command": "<argv joined with shlex>"}'})
        try:
            argv = shlex.split(body["command"])
        except ValueError as exc:
            raise Reply(400, {"error": f"command does not split into arguments: {exc}"}) from None
        if not argv:
            raise Reply(400, {"error": "command is empty"})
        target = model = None
        if dispatch:
            target, model = body.get("target"), body.get("model")
            if not isinstance(target, str) or not isinstance(model, str):
                raise Reply(400, {"error": "dispatch needs string fields target and model"})
        key = getattr(self._request, "key", None)
        if key is not None and not _KEY_RE.fullmatch(key):
            raise Reply(
                400,
                {
                    "error": f"{IDEMPOTENCY_HEADER} must be 1-255 printable ASCII "
                    "characters without spaces"
                },
            )
        request = ("dispatch" if dispatch else "spawn", body["command"], target, model)
        task = GatewayTask(task_id=uuid.uuid4().hex, argv=argv, target=target, model=model)
        with self._lock:  # one lock for the lookup and the insert: two retries race here
            known = self._by_key.get(key) if key is not None else None
            if known is None:
                self._tasks[task.task_id] = task
                if key is not None:
                    self._by_key[key] = (request, task.task_id)
        if known is not None:
            if known[0] != request:
                raise Reply(
                    422,
                    {
                        "error": f"{IDEMPOTENCY_HEADER} {key!r} was first used for a "
                        "different request; use a new key for new work"
                    },
                )
            log.info("aura dev server: %s %s replayed task %s", IDEMPOTENCY_HEADER, key, known[1])
            self._answer_after_effect(known[1])
            return {"task_id": known[1], "replayed": True}
        with self._faults_lock:
            stall = self.faults.stall_next_tasks > 0
            if stall:
                self.faults.stall_next_tasks -= 1
        if stall:
            task.status = "running"  # and so it stays
        else:
            threading.Thread(
                target=self._run, args=(task,), name=f"aura-task-{task.task_id[:8]}", daemon=True
            ).start()
        log.info("aura dev server: task %s: %s", task.task_id, shlex.join(argv))
        self._answer_after_effect(task.task_id)
        return {"task_id": task.task_id}

    def _get_task(self, params: dict, body: Any) -> dict:
        with self._lock:
            task = self._tasks.get(params["task_id"])
        if task is None:
            raise Reply(404, {"error": f"unknown task {params['task_id']!r}"})
        return task.as_json()

    # -- execution ---------------------------------------------------------------------------

    def _run(self, task: GatewayTask) -> None:
        try:
            self._execute(task)
        finally:
            task.finished.set()

    def _execute(self, task: GatewayTask) -> None:
        with self._slots:
            if self._stopping.is_set():
                task.error, task.status = "gateway stopped before the task ran", "failed"
                return
            try:
                proc = subprocess.Popen(
                    task.argv,  # an argument list: no shell ever sees the command
                    cwd=self.workdir,
                    env=agent_env(self.env),  # the allowlist: never this server's secrets
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    errors="replace",
                    start_new_session=True,  # its own process group, so stop() can kill the tree
                )
            except OSError as exc:
                task.error = f"cannot run {task.argv[0]!r}: {exc.strerror or exc}"
                task.status = "failed"
                return
            task.proc = proc
            task.status = "running"
            try:
                out, err = proc.communicate(timeout=self.task_timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                out, err = proc.communicate()
                task.output = out
                # Error before status: a poller that sees "failed" must also see why.
                task.error = f"timed out after {self.task_timeout:g} s and was killed"
                task.status = "failed"
                return
            task.exit_code = proc.returncode
            task.output = out
            if proc.returncode == 0:
                task.status = "done"
            else:
                detail = (err or out or "").strip()[-TAIL:]
                task.error = f"exit code {proc.returncode}" + (f": {detail}" if detail else "")
                task.status = "failed"
