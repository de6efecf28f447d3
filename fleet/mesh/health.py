"""The node agent's HTTP health endpoint: GET /health → identity, active tasks, heartbeat, panes."""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)

HealthSnapshot = Callable[[], dict[str, Any]]


class HealthServer:
    """A stdlib HTTP server in a daemon thread; `snapshot()` is called per request.

    `host` is the address it binds (all interfaces by default); `advertise_host` is the name
    other machines reach it at — the watchdog probes the advertised URL from its own host, so
    it must never be loopback in a mesh of several machines.
    """

    def __init__(self, snapshot: HealthSnapshot, *, host: str = "0.0.0.0", port: int = 9300,
                 advertise_host: str | None = None, metrics: Callable[[], bytes] | None = None,
                 token: str | None = None):
        self._snapshot = snapshot
        # Optional bearer token (seed 001 WAN discipline): the endpoint shows identity and tasks.
        # A 401 is still an answer, so the watchdog's reachability probe needs no token.
        self._token = token or None
        self._metrics = metrics  # GET /metrics (Prometheus text), when given
        self._host = host
        self._port = port
        self._advertise_host = advertise_host or None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def url(self) -> str:
        """The URL other machines use: the advertised host, else this host's name for a
        wildcard bind, else the bound address."""
        host = self._advertise_host or (
            socket.getfqdn() if self._host in ("", "0.0.0.0", "::") else self._host)
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}/health"

    def start(self) -> HealthServer:
        snapshot = self._snapshot
        metrics = self._metrics
        token = self._token

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
                if token is not None and not hmac.compare_digest(
                        self.headers.get("Authorization", ""), f"Bearer {token}"):
                    self._reply(401, {"error": "a bearer token is required (Authorization: Bearer …)"})
                    return
                if metrics is not None and self.path.split("?", 1)[0] == "/metrics":
                    try:
                        data = metrics()
                    except Exception as exc:
                        self._reply(503, {"error": f"metrics unavailable: {exc}"})
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if self.path.split("?", 1)[0] not in ("/health", "/"):
                    self._reply(404, {"error": f"no such path {self.path!r}; try GET /health"})
                    return
                try:
                    body = snapshot()
                except Exception as exc:  # a broken snapshot must still answer, truthfully
                    log.exception("health snapshot failed")
                    self._reply(500, {"status": "error", "error": f"{type(exc).__name__}: {exc}"})
                    return
                self._reply(200, body)

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("health: " + format, *args)

        try:
            self._httpd = ThreadingHTTPServer((self._host, self._port), Handler)
        except OSError as exc:
            from fleet.errors import ConfigError

            raise ConfigError(
                f"health endpoint cannot listen on {self._host}:{self._port}: {exc} — "
                "pick another --health-port or stop the process using it"
            ) from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fleet-agent-health",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
