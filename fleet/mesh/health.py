"""The node agent's HTTP health endpoint: GET /health → identity, active tasks, heartbeat, panes."""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable
from typing import Any

from fleet.clients.transport import is_loopback
from fleet.jsonhttp import JsonServer, Request, Response
from fleet.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)


HealthSnapshot = Callable[[], dict[str, Any]]
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# A TEST-NET-1 address (RFC 5737): a UDP socket "connected" to it sends nothing, it only
# makes the kernel pick the interface that routes outward.
_ROUTE_PROBE = ("192.0.2.1", 9)


def reachable_host_name() -> str:
    """This host's name as other machines reach it: the FQDN, else the host name, else the
    address of the interface that routes outward. Loopback only when there is nothing else
    (no network at all), which the agent's CLI then warns about."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if name and not is_loopback(name):
            return name
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(_ROUTE_PROBE)
            address = probe.getsockname()[0]
    except OSError:
        address = ""
    if address and address != "0.0.0.0" and not is_loopback(address):
        return address
    return socket.getfqdn()


class HealthServer:
    """A JSON server (fleet/jsonhttp.py) in a daemon thread; `snapshot()` is called per request.

    `host` is the address it binds (all interfaces by default); `advertise_host` is the name
    other machines reach it at — the watchdog probes the advertised URL from its own host, so
    it must never be loopback in a mesh of several machines.
    """

    def __init__(
        self,
        snapshot: HealthSnapshot,
        *,
        host: str = "0.0.0.0",
        port: int = 9300,
        advertise_host: str | None = None,
        metrics: Callable[[], bytes] | None = None,
        token: str | None = None,
    ):
        self._snapshot = snapshot
        # Optional bearer token (seed 001 WAN discipline): the endpoint shows identity and tasks.
        # A 401 is still an answer, so the watchdog's reachability probe needs no token.
        self._token = token or None
        self._metrics = metrics  # GET /metrics (Prometheus text), when given
        self._host = host
        self._advertise_host = advertise_host or None
        self._server = JsonServer(self._respond, host=host, port=port, name="fleet-agent-health")

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return self._server.port

    @property
    def url(self) -> str:
        """The URL other machines use: the advertised host, else this host's reachable name
        for a wildcard bind, else the bound address."""
        host = self._advertise_host or (
            reachable_host_name() if self._host in WILDCARD_HOSTS else self._host
        )
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}/health"

    def _respond(self, request: Request) -> Response:
        if request.method != "GET":
            return Response(405, {"error": f"{request.method} not allowed; try GET /health"})
        if self._token is not None and not hmac.compare_digest(
            request.headers.get("Authorization", ""), f"Bearer {self._token}"
        ):
            return Response(401, {"error": "a bearer token is required (Authorization: Bearer …)"})
        if self._metrics is not None and request.path == "/metrics":
            try:
                return Response(200, raw=self._metrics(), content_type=CONTENT_TYPE)
            except Exception as exc:
                return Response(503, {"error": f"metrics unavailable: {exc}"})
        if request.path not in ("/health", "/"):
            return Response(404, {"error": f"no such path {request.path!r}; try GET /health"})
        try:
            return Response(200, self._snapshot())
        except Exception as exc:  # a broken snapshot must still answer, truthfully
            log.exception("health snapshot failed")
            return Response(500, {"status": "error", "error": f"{type(exc).__name__}: {exc}"})

    def start(self) -> HealthServer:
        try:
            self._server.start()
        except OSError as exc:
            from fleet.errors import ConfigError

            raise ConfigError(
                f"health endpoint cannot listen on {self._host}:{self._server.port}: {exc} — "
                "pick another --health-port or stop the process using it"
            ) from exc
        return self

    def stop(self) -> None:
        self._server.stop()
