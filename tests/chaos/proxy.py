"""A TCP proxy of the chaos suite's own, to cut a real server (PostgreSQL) off and back.

It listens on 127.0.0.1 at a port the OS picks and forwards every connection to the
upstream. `cut()` closes every open connection and from then on accepts and at once closes
new ones (a client sees the server drop it, as when the network or the server goes away);
`restore()` forwards again. The shared server itself is never touched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # the accept loop notices close() within 0.1 s
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._is_cut = threading.Event()
        self._closed = threading.Event()
        self.forwarded = 0  # connections forwarded to the upstream
        self.refused = 0  # connections dropped while cut
        self._acceptor = threading.Thread(
            target=self._accept_loop, daemon=True, name=f"tcp-proxy-{self.port}"
        )
        self._acceptor.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore()`."""
        self._is_cut.set()
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            _hang_up(sock)

    def restore(self) -> None:
        self._is_cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._acceptor.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._is_cut.is_set():
                self.refused += 1
                _hang_up(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _hang_up(client)
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self._open.update((client, server))
            self.forwarded += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass  # the other side or cut() closed it: the hang-up below finishes the pair
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _hang_up(src)
            _hang_up(dst)


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected any more
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
