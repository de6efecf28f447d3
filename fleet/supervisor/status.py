"""Status endpoint: GET /status or /supervisor/status (JSON of the supervisor and its processes),
GET /healthz (200/503)."""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from fleet.clock import Clock, SystemClock
from fleet.settings import get_settings

# A managed process's state as the seed's `mcp_servers` map shows it.
_SERVER_HEALTH = {
    "running": "healthy", "pending": "starting", "backoff": "restarting", "exiting": "restarting",
    "exited": "exited", "stopped": "stopped", "gave_up": "failed", "failed_to_start": "failed",
}

if TYPE_CHECKING:
    from fleet.supervisor.procman import ProcessManager
    from fleet.supervisor.runner import Supervisor


class StatusServer:
    """Serves the status of an optional Supervisor and an optional ProcessManager on a thread."""

    def __init__(
        self,
        supervisor: Supervisor | None = None,
        processes: ProcessManager | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        clock: Clock | None = None,
    ):
        self.supervisor = supervisor
        self.processes = processes
        self.clock = clock or SystemClock()
        self.started_at = self.clock.now()
        port = get_settings().supervisor_status_port if port is None else port
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="supervisor-status", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ documents

    def status(self) -> dict:
        """The seed's document (`status`, `current_commit`, `consecutive_failures`, `uptime`,
        `mcp_servers`) with the richer fields beside it (`state`, `reason`, `app`, `processes`)."""
        uptime = (self.clock.now() - self.started_at).total_seconds()
        body: dict = {
            "state": "running",
            "reason": "",
            "uptime_seconds": round(uptime, 3),
            "uptime": _human(uptime),
            "current_commit": None,
            "consecutive_failures": 0,
        }
        if self.supervisor is not None:
            sup = self.supervisor.status()
            body.update({k: sup[k] for k in ("state", "reason", "current_commit", "consecutive_failures")})
            body["app"] = sup
        processes = self.processes.status() if self.processes is not None else {}
        body["processes"] = processes
        problems = self.problems()
        if problems and body["state"] != "emergency_stop":
            body["state"] = "degraded"
            body["reason"] = "; ".join(problems)
        body["status"] = body["state"]
        body["mcp_servers"] = {
            name: _SERVER_HEALTH.get(p["state"], p["state"]) for name, p in processes.items()
        }
        return body

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.supervisor is not None and not self.supervisor.healthy():
            found.append(self.supervisor.reason)
        if self.processes is not None:
            for name, proc in self.processes.status().items():
                if proc["state"] in ("gave_up", "failed_to_start"):
                    found.append(f"{name}: {proc['reason']}")
        return found


def _human(seconds: float) -> str:
    """2h34m, 5m07s, 42s — as the seed's status example shows uptime."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in ("/status", "/supervisor/status"):  # the seed's curl uses the longer path
                self._send(HTTPStatus.OK, server.status())
            elif path == "/healthz":
                problems = server.problems()
                code = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
                self._send(code, {"ok": not problems, "problems": problems})
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {path!r}; try /status or /healthz"})

        def _send(self, code: HTTPStatus, body: dict) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # polled often; access logs would drown the supervisor's own output

    return Handler
