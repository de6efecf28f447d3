"""Dev servers: JSON routes in a background thread, with faults tests and operators can inject."""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import unquote

from fleet.jsonhttp import JsonServer, Request, Response

log = logging.getLogger("fleet.devservers")

ADMIN_PREFIX = "/_admin/"


@dataclass
class Faults:
    """What goes wrong on purpose. Counters count down per request; admin calls are exempt."""

    fail_next: int = 0  # the next N requests get `fail_status` (a 5xx burst)
    fail_status: int = 503
    latency: float = 0.0  # seconds added before every answer
    hang_next: int = 0  # the next N requests hang `hang_seconds` (or until stop)
    hang_seconds: float = 30.0
    malformed_next: int = 0  # the next N answers are not JSON
    reject_auth: bool = False  # every request gets 401, as if the token were wrong

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {sorted(known)}")
        for name, value in values.items():
            current = getattr(self, name)
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"fault {name} takes true/false, got {value!r}")
            elif isinstance(current, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"fault {name} takes a whole number >= 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"fault {name} takes a number >= 0, got {value!r}")
            setattr(self, name, value)


class Reply(Exception):
    """Raised by a route to answer with a status and a JSON body."""

    def __init__(self, status: int, body: Any):
        super().__init__(status)
        self.status = status
        self.body = body


Route = Callable[[dict[str, str], Any], Any]


class DevServer:
    """A JSON server (fleet/jsonhttp.py) on host:port (port 0 = any free port) serving routes.

    Subclasses register routes with `self.route(method, pattern, fn)`; `fn(params, body)`
    returns the JSON answer or raises Reply. A bearer token, when set, is required on every
    request (admin ones included).
    """

    name = "devserver"
    faults_class: type[Faults] = Faults

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.host = host
        self.port = port
        self._token = token
        self.faults = self.faults_class()
        self._faults_lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern[str], Route]] = []
        self._stopping = threading.Event()
        self._server: JsonServer | None = None
        # (method, path) of recent non-admin requests, for tests and for a look while debugging.
        self.requests: deque[tuple[str, str]] = deque(maxlen=10_000)
        self.route("GET", r"/_admin/faults", lambda p, b: self._faults_dict())
        self.route("POST", r"/_admin/faults", self._set_faults)
        self.route("GET", r"/healthz", lambda p, b: {"ok": True})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url if self._server else 'stopped'})"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{self.name} dev server is not running; call start() first")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> DevServer:
        self._server = JsonServer(
            self._handle, host=self.host, port=self.port, name=f"{self.name}-dev"
        ).start()
        self.port = self._server.port
        self._stopping.clear()
        log.info("%s dev server listening on %s", self.name, self.url)
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------

    def set_faults(self, **values: Any) -> None:
        with self._faults_lock:
            self.faults.update(values)

    def clear_faults(self) -> None:
        with self._faults_lock:
            self.faults = self.faults_class()

    def _faults_dict(self) -> dict:
        with self._faults_lock:
            return asdict(self.faults)

    def _set_faults(self, params: dict, body: Any) -> dict:
        if not isinstance(body, dict):
            raise Reply(400, {"error": "body must be a JSON object of faults"})
        try:
            self.set_faults(**body)
        except ValueError as exc:
            raise Reply(400, {"error": str(exc)}) from None
        return self._faults_dict()

    def _take_fault(self) -> str | None:
        """Decide this request's fault (and spend one count), under the lock."""
        with self._faults_lock:
            f = self.faults
            if f.reject_auth:
                return "auth"
            if f.hang_next > 0:
                f.hang_next -= 1
                return "hang"
            if f.fail_next > 0:
                f.fail_next -= 1
                return "fail"
            if f.malformed_next > 0:
                f.malformed_next -= 1
                return "malformed"
            return None

    # -- routing ---------------------------------------------------------------------------

    def route(self, method: str, pattern: str, fn: Route) -> None:
        self._routes.append((method, re.compile(pattern + r"\Z"), fn))

    def _authorized(self, header: str | None) -> bool:
        if not self._token:
            return True
        expected = f"Bearer {self._token}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def _handle(self, request: Request) -> Response | None:
        method, path = request.method, request.path
        admin = path.startswith(ADMIN_PREFIX)
        if not admin:
            self.requests.append((method, path))
        fault = None if admin else self._take_fault()
        latency = 0.0 if admin else self.faults.latency
        if latency:
            self._stopping.wait(latency)
        if fault == "hang":
            self._stopping.wait(self.faults.hang_seconds)
            return None
        if fault == "auth" or not self._authorized(request.headers.get("Authorization")):
            return Response(401, {"error": "unauthorized: wrong or missing bearer token"})
        if fault == "fail":
            return Response(self.faults.fail_status, {"error": "injected failure"})
        try:
            body = json.loads(request.body) if request.body else None
        except json.JSONDecodeError:
            return Response(400, {"error": "body is not JSON"})
        allowed = []
        for route_method, pattern, fn in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            try:
                answer = fn(params, body)
                status = 200
            except Reply as reply:
                status, answer = reply.status, reply.body
            except Exception as exc:  # a dev server answers 500 instead of dropping the socket
                log.exception("%s dev server: %s %s failed", self.name, method, path)
                status, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
            if fault == "malformed":
                return Response(status, raw=b'{"status": "done", "output": ')
            return Response(status, answer)
        if allowed:
            return Response(405, {"error": f"{method} not allowed on {path}; use {allowed}"})
        return Response(404, {"error": f"no route for {method} {path}"})
