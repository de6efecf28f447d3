"""Pane control for the node agent: list, read, inject into, respawn tmux panes (libtmux 0.62)."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import libtmux
import libtmux.exc
import psutil

from fleet.errors import TmuxError

# Detached sessions default to 80x24; a wider pane wraps less, so capture-pane -J has less to join.
PANE_WIDTH = 200
PANE_HEIGHT = 50
# A pane created before its real command starts: it blocks on the tty until respawned, which
# lets remain-on-exit be set before the agent can exit (no race with an instantly failing agent).
_PLACEHOLDER = ["cat"]
_FIELDS = (
    "pane_id",
    "session_name",
    "window_index",
    "pane_pid",
    "pane_current_command",
    "pane_dead",
)
_SEP = "\x1f"

# "context: 42%" (our scripted agent, hook scripts) and Claude Code's
# "Context left until auto-compact: 12%" (remaining, not used). Anchored at the start of a
# line (after box-drawing/prompt characters) so the echo of injected text never counts.
_LEAD = r"^[\s│|>*·•]*"
_CONTEXT_USED = re.compile(
    _LEAD + r"context:\s*(\d{1,3}(?:\.\d+)?)\s*%", re.IGNORECASE | re.MULTILINE
)
_CONTEXT_LEFT = re.compile(
    _LEAD + r"context left until auto-compact:\s*(\d{1,3}(?:\.\d+)?)\s*%",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class PaneInfo:
    pane_id: str
    session: str
    window: str
    pid: int | None
    current_command: str
    dead: bool


def chunk_utf8(text: str, max_bytes: int) -> list[str]:
    """Split `text` into pieces of at most `max_bytes` UTF-8 bytes, never inside a character."""
    if max_bytes < 4:
        raise ValueError(
            f"max_bytes={max_bytes} cannot hold every UTF-8 character — use at least 4"
        )
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode("utf-8"))
        if size + width > max_bytes:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(char)
        size += width
    if current:
        chunks.append("".join(current))
    return chunks


def session_name(name: str) -> str:
    """tmux turns '.' and ':' in session names into '_'; do the same so lookups match."""
    return re.sub(r"[.:]", "_", name)


def _tmux_literal(arg: str) -> str:
    """tmux reads an argv element ending in ';' as a command separator; '\\;' keeps the ';'."""
    return arg[:-1] + "\\;" if arg.endswith(";") else arg


def context_ratio(pane_text: str) -> float | None:
    """Heuristic hook: the last context-usage figure shown in the pane, as a 0..1 ratio, or None."""
    best: tuple[int, float] | None = None
    for match in _CONTEXT_USED.finditer(pane_text):
        best = (match.start(), float(match.group(1)) / 100)
    for match in _CONTEXT_LEFT.finditer(pane_text):
        if best is None or match.start() > best[0]:
            best = (match.start(), 1 - float(match.group(1)) / 100)
    if best is None:
        return None
    return min(max(best[1], 0.0), 1.0)


class PaneControl:
    """The tmux operations the agent needs, on one tmux server (socket)."""

    def __init__(self, server: libtmux.Server, *, chunk_bytes: int = 200):
        self.server = server
        self.chunk_bytes = chunk_bytes

    # -- raw ----------------------------------------------------------------------------
    def _cmd(self, *args: str):
        try:
            return self.server.cmd(*args)
        except libtmux.exc.TmuxCommandNotFound as exc:
            raise TmuxError("tmux is not installed or not on PATH — install tmux (≥ 3.0)") from exc

    def _run(self, *args: str) -> list[str]:
        proc = self._cmd(*args)
        if proc.returncode != 0:
            detail = "; ".join(proc.stderr) or f"exit {proc.returncode}"
            raise TmuxError(
                f"tmux {args[0]} failed on socket "
                f"{self.server.socket_name or self.server.socket_path}: "
                f"{detail} — check that the tmux server is running and the pane exists"
            )
        return proc.stdout

    # -- queries ------------------------------------------------------------------------
    def list_panes(self, session: str | None = None) -> list[PaneInfo]:
        fmt = _SEP.join(f"#{{{name}}}" for name in _FIELDS)
        proc = self._cmd("list-panes", "-a", "-F", fmt)
        if proc.returncode != 0:
            # No server yet means no panes, not an error.
            return []
        panes = []
        for line in proc.stdout:
            parts = line.split(_SEP)
            if len(parts) != len(_FIELDS):
                continue
            pane_id, sess, window, pid, command, dead = parts
            if session is not None and sess != session_name(session):
                continue
            panes.append(
                PaneInfo(
                    pane_id=pane_id,
                    session=sess,
                    window=window,
                    pid=int(pid) if pid.isdigit() else None,
                    current_command=command,
                    dead=dead == "1",
                )
            )
        return panes

    def pane(self, pane_id: str) -> PaneInfo | None:
        return next((p for p in self.list_panes() if p.pane_id == pane_id), None)

    def is_alive(self, pane_id: str) -> bool:
        """The pane exists, tmux does not mark it dead, and its process runs (not a zombie)."""
        info = self.pane(pane_id)
        if info is None or info.dead or info.pid is None:
            return False
        try:
            return psutil.Process(info.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def read_pane(self, pane_id: str, lines: int = 200) -> str:
        """The last `lines` lines of the pane (history included), wrapped lines joined."""
        out = self._run("capture-pane", "-p", "-J", "-t", pane_id, "-S", f"-{int(lines)}")
        return "\n".join(out)

    # -- actions ------------------------------------------------------------------------
    def inject(self, pane_id: str, text: str, enter: bool = True) -> None:
        """Type `text` into the pane exactly as given.

        One line: literal `send-keys -l` in chunks of ≤ chunk_bytes (tmux and the agents split
        long input around 255 bytes). Several lines: one bracketed paste (load-buffer +
        paste-buffer -p), so a TUI agent receives them as a single block instead of submitting
        each line; programs reading a cooked tty still receive one line per line.
        """
        if "\n" in text or "\r" in text:
            self._paste(pane_id, text.replace("\r\n", "\n"))
        else:
            for chunk in chunk_utf8(text, self.chunk_bytes):
                self._run("send-keys", "-t", pane_id, "-l", "--", _tmux_literal(chunk))
        if enter:
            self._run("send-keys", "-t", pane_id, "Enter")

    def _paste(self, pane_id: str, text: str) -> None:
        buffer = f"fleet-{uuid.uuid4().hex[:12]}"
        fd, path = tempfile.mkstemp(prefix="fleet-paste-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode("utf-8"))
            self._run("load-buffer", "-b", buffer, path)
            self._run("paste-buffer", "-p", "-d", "-b", buffer, "-t", pane_id)
        finally:
            os.unlink(path)

    def spawn(self, session: str, command: Sequence[str]) -> str:
        """Start `command` (argv, no shell) in a new window of `session`; returns the pane id."""
        if not command:
            raise TmuxError(
                "cannot spawn an empty command — give the agent's argv, e.g. ['claude']"
            )
        session = session_name(session)
        if self._cmd("has-session", "-t", f"={session}").returncode == 0:
            out = self._run(
                "new-window",
                "-d",
                "-P",
                "-F",
                "#{pane_id}",
                "-t",
                f"={session}:",
                "--",
                *_PLACEHOLDER,
            )
        else:
            out = self._run(
                "new-session",
                "-d",
                "-P",
                "-F",
                "#{pane_id}",
                "-s",
                session,
                "-x",
                str(PANE_WIDTH),
                "-y",
                str(PANE_HEIGHT),
                "--",
                *_PLACEHOLDER,
            )
        pane_id = out[0].strip()
        # Keep the pane when the agent exits, so the node agent can see it dead and respawn it.
        self._run("set-option", "-w", "-t", pane_id, "remain-on-exit", "on")
        self.respawn(pane_id, command)
        return pane_id

    def respawn(self, pane_id: str, command: Sequence[str]) -> None:
        """Kill whatever runs in the pane and start `command` afresh (`respawn-pane -k`)."""
        if not command:
            raise TmuxError("cannot respawn with an empty command — give the agent's argv")
        self._run("respawn-pane", "-k", "-t", pane_id, "--", *[str(c) for c in command])
        # Old markers in the scrollback must not be read as the new process's output.
        self._run("clear-history", "-t", pane_id)

    def kill_pane(self, pane_id: str) -> None:
        self._cmd("kill-pane", "-t", pane_id)

    def context_ratio(self, pane_text: str) -> float | None:
        return context_ratio(pane_text)
