"""Status endpoint: GET /status or /supervisor/status (JSON of the supervisor and its processes),
GET /healthz (200/503), GET /metrics (Prometheus text)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge

from fleet.clock import Clock, SystemClock
from fleet.jsonhttp import JsonServer, Request, Response
from fleet.metrics import CONTENT_TYPE, render
from fleet.settings import get_settings

# A managed process's state as the seed's `mcp_servers` map shows it.
_SERVER_HEALTH = {
    "running": "healthy",
    "pending": "starting",
    "backoff": "restarting",
    "exiting": "restarting",
    "exited": "exited",
    "stopped": "stopped",
    "gave_up": "failed",
    "failed_to_start": "failed",
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
        metrics: Callable[[], bytes] | None = None,
    ):
        self.supervisor = supervisor
        self.processes = processes
        # More Prometheus text after the supervisor's own (fleet.metrics.metrics_endpoint: the
        # mesh's figures, when the supervisor can reach the store).
        self._metrics = metrics
        self.clock = clock or SystemClock()
        self.started_at = self.clock.now()
        port = get_settings().supervisor_status_port if port is None else port
        self._server = JsonServer(self._respond, host=host, port=port, name="supervisor-status")

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://{self._server.host}:{self.port}"

    def start(self) -> StatusServer:
        """Bind and serve (once); OSError (e.g. the port is taken) is the caller's to explain."""
        if not self._server.running:
            self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

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
            body.update(
                {k: sup[k] for k in ("state", "reason", "current_commit", "consecutive_failures")}
            )
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

    def metrics(self) -> bytes:
        """The status document as Prometheus gauges, then the injected source's text."""
        body = self.status()
        registry = CollectorRegistry()
        Gauge("fleet_supervisor_uptime_seconds", "Supervisor uptime", registry=registry).set(
            body["uptime_seconds"]
        )
        Gauge(
            "fleet_supervisor_consecutive_failures",
            "Rejected changes in a row (emergency stop at the limit)",
            registry=registry,
        ).set(body["consecutive_failures"])
        Gauge("fleet_supervisor_healthy", "1 unless degraded or stopped", registry=registry).set(
            int(body["state"] not in ("degraded", "emergency_stop"))
        )
        by_state = Gauge(
            "fleet_supervisor_processes", "Managed processes by state", ["state"], registry=registry
        )
        for state, n in Counter(p["state"] for p in body["processes"].values()).items():
            by_state.labels(state=state).set(n)
        return render(registry) + (self._metrics() if self._metrics is not None else b"")

    def _respond(self, request: Request) -> Response:
        path = request.path.rstrip("/")
        if request.method != "GET":
            return Response(405, {"error": f"{request.method} not allowed; try GET /status"})
        if path in ("/status", "/supervisor/status"):  # the seed's curl uses the longer path
            return Response(200, self.status())
        if path == "/metrics":
            try:
                return Response(200, raw=self.metrics(), content_type=CONTENT_TYPE)
            except Exception as exc:  # the store behind the injected source may be away
                return Response(503, {"error": f"metrics unavailable: {exc}"})
        if path == "/healthz":
            problems = self.problems()
            return Response(503 if problems else 200, {"ok": not problems, "problems": problems})
        return _not_found(path)


def _human(seconds: float) -> str:
    """2h34m, 5m07s, 42s — as the seed's status example shows uptime."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _not_found(path: str) -> Response:
    return Response(404, {"error": f"no such path {path!r}; try /status, /healthz or /metrics"})
