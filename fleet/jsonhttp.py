"""One small stdlib JSON HTTP server in a daemon thread, for the dev servers and health endpoints.

The server owns sockets, threads, body limits and the wire format; what a request means is
the owner's `respond(request)`, which returns a Response (or None to give no answer and drop
the connection, as a hung server would).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("fleet.jsonhttp")

MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    headers: Message  # case-insensitive, as http.server parsed them
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None
    raw: bytes | None = None  # sent as is instead of the JSON of `body` (a malformed answer)
    content_type: str = "application/json"


Respond = Callable[[Request], "Response | None"]


class JsonServer:
    """ThreadingHTTPServer on host:port (port 0 = any free port) answering JSON from a thread."""

    def __init__(
        self,
        respond: Respond,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "fleet",
        max_body: int = MAX_BODY,
    ):
        self._respond = respond
        self.host = host
        self._port = port
        self.name = name
        self._max_body = max_body
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for before)."""
        return self._httpd.server_address[1] if self._httpd else self._port

    def start(self) -> JsonServer:
        """Bind and serve; OSError (e.g. the port is taken) is the caller's to explain."""
        self._httpd = ThreadingHTTPServer((self.host, self._port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.name}-http",
            daemon=True,
        )
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

    def _serve(self, req: BaseHTTPRequestHandler, method: str) -> None:
        # Read the body first: on a kept-alive connection an unread body would be taken for
        # the next request.
        length = int(req.headers.get("Content-Length") or 0)
        if length > self._max_body:
            req.close_connection = True
            return send(req, Response(413, {"error": f"body over {self._max_body} bytes"}))
        body = req.rfile.read(length) if length else b""
        request = Request(method, req.path.split("?", 1)[0], req.headers, body)
        try:
            response = self._respond(request)
        except Exception as exc:  # answer 500 rather than drop the socket
            log.exception("%s: %s %s failed", self.name, method, request.path)
            response = Response(500, {"error": f"{type(exc).__name__}: {exc}"})
        if response is None:
            req.close_connection = True
            return
        send(req, response)


def send(req: BaseHTTPRequestHandler, response: Response) -> None:
    payload = response.raw
    if payload is None:
        payload = json.dumps(response.body, default=str).encode("utf-8")
    try:
        req.send_response(response.status)
        req.send_header("Content-Type", response.content_type)
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        req.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up (e.g. its timeout); nothing left to tell it


def _handler(server: JsonServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms.
        disable_nagle_algorithm = True
        server_version = f"fleet-{server.name}"

        # Method names (do_GET, log_message's `format`) are http.server's.
        def do_GET(self) -> None:
            server._serve(self, "GET")

        def do_POST(self) -> None:
            server._serve(self, "POST")

        def do_PUT(self) -> None:
            server._serve(self, "PUT")

        def do_DELETE(self) -> None:
            server._serve(self, "DELETE")

        def log_message(self, format: str, *args: Any) -> None:
            # Request lines carry no secrets (tokens are headers); keep them at debug.
            log.debug("%s %s", server.name, format % args)

    return Handler
