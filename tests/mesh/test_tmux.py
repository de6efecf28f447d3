"""PaneControl on a real tmux server (temp socket) with the scripted agent running in the panes."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import libtmux
import pytest

from fleet.errors import TmuxError
from fleet.mesh.tmux import PaneControl, chunk_utf8, context_ratio

pytestmark = [
    pytest.mark.tmux,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs a tmux binary"),
]

SCRIPTED = [sys.executable, "-m", "fleet.mesh.scripted_agent"]


def kill_server(server: libtmux.Server) -> None:
    """Kill a test tmux server and remove its socket file (tmux 3.3 leaves it behind)."""
    if server.is_alive():
        server.kill()
    if server.socket_name:
        base = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (base / server.socket_name).unlink(missing_ok=True)


@pytest.fixture
def tmux_server():
    server = libtmux.Server(socket_name=f"fleet-test-{uuid.uuid4().hex[:10]}")
    yield server
    kill_server(server)


@pytest.fixture
def panes(tmux_server) -> PaneControl:
    return PaneControl(tmux_server, chunk_bytes=200)


def wait_for_text(panes: PaneControl, pane_id: str, needle: str, timeout: float = 10.0) -> str:
    """Poll capture-pane until `needle` shows (tmux output is asynchronous)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = panes.read_pane(pane_id, lines=500)
        if needle in text:
            return text
        time.sleep(0.03)
    raise AssertionError(
        f"{needle!r} not seen in pane {pane_id} within {timeout}s; pane shows:\n{text}"
    )


def sha1(line: str) -> str:
    return hashlib.sha1(line.encode("utf-8")).hexdigest()


def test_chunks_respect_byte_limit_and_character_boundaries():
    text = "aé€𝄞" * 60  # 1-, 2-, 3- and 4-byte characters
    chunks = chunk_utf8(text, 200)
    assert "".join(chunks) == text
    assert all(len(c.encode("utf-8")) <= 200 for c in chunks)
    # Greedy: every chunk but the last is full to within one character.
    assert all(len(c.encode("utf-8")) > 196 for c in chunks[:-1]) and len(chunks) > 1
    with pytest.raises(ValueError):
        chunk_utf8("x", 3)


def test_context_ratio_reads_the_last_figure():
    assert context_ratio("context: 42%\nwork\ncontext: 87%") == pytest.approx(0.87)
    assert context_ratio("Context left until auto-compact: 10%") == pytest.approx(0.90)
    assert context_ratio("no figure here") is None
    assert context_ratio("TASK t1 resume [context: 95%]") is None  # an echo, not a reading


def test_spawn_lists_the_pane_alive(panes):
    pane_id = panes.spawn("fleet-t", SCRIPTED)
    wait_for_text(panes, pane_id, "scripted agent ready")
    info = panes.pane(pane_id)
    assert info is not None and info.session == "fleet-t" and not info.dead
    assert info.pid is not None
    assert panes.is_alive(pane_id)
    second = panes.spawn("fleet-t", SCRIPTED)
    assert {p.pane_id for p in panes.list_panes("fleet-t")} == {pane_id, second}
    assert panes.list_panes("other-session") == []
    # tmux rewrites '.' in session names; lookups by the original name still match.
    dotted = panes.spawn("fleet-mac3.local", SCRIPTED)
    assert [p.pane_id for p in panes.list_panes("fleet-mac3.local")] == [dotted]


def test_500_byte_injection_arrives_intact(panes):
    pane_id = panes.spawn("fleet-t", SCRIPTED)
    wait_for_text(panes, pane_id, "scripted agent ready")
    # 500+ bytes with multi-byte characters, shell metacharacters and a ';' at a chunk edge.
    line = (
        "TASK t500 " + "a" * 189 + ";" + "ünïcødé-€ $(rm -rf /) 'quoted' \"dq\" back\\slash; " * 7
    )
    line = line.rstrip() + ";"
    assert len(line.encode("utf-8")) >= 500
    assert any(c.endswith(";") for c in chunk_utf8(line, 200))
    panes.inject(pane_id, line)
    text = wait_for_text(panes, pane_id, f"ACK {sha1(line)}")
    assert line in text  # the tty echo, wrapped lines joined by capture-pane -J


def test_line_ending_in_semicolon_keeps_it(panes):
    pane_id = panes.spawn("fleet-t", SCRIPTED)
    wait_for_text(panes, pane_id, "scripted agent ready")
    panes.inject(pane_id, "-starts with a dash and ends with;")
    wait_for_text(panes, pane_id, f"ACK {sha1('-starts with a dash and ends with;')}")


def test_multi_line_injection_arrives_line_by_line_intact(panes):
    pane_id = panes.spawn("fleet-t", SCRIPTED)
    wait_for_text(panes, pane_id, "scripted agent ready")
    lines = ["first line", "  indented: x = {'a': 1};", "x" * 300, "last ✓"]
    panes.inject(pane_id, "\n".join(lines))
    text = wait_for_text(panes, pane_id, f"ACK {sha1(lines[-1])}")
    for line in lines:
        assert f"ACK {sha1(line)}" in text
    # Nothing was split into extra lines: exactly one ACK per line injected.
    assert text.count("ACK ") == len(lines)


def test_task_line_is_finished_by_the_scripted_agent(panes):
    pane_id = panes.spawn("fleet-t", SCRIPTED)
    wait_for_text(panes, pane_id, "scripted agent ready")
    panes.inject(pane_id, "TASK abc123 hello world")
    text = wait_for_text(panes, pane_id, "DONE abc123")
    assert "OUTPUT abc123 hello world" in text
    assert panes.context_ratio(text) == pytest.approx(0.42)


def test_dead_pane_is_seen_and_respawned(panes):
    pane_id = panes.spawn("fleet-t", [*SCRIPTED, "--exit-after", "1"])
    wait_for_text(panes, pane_id, "scripted agent ready")
    panes.inject(pane_id, "TASK t1 work")
    wait_for_text(panes, pane_id, "DONE t1")
    deadline = time.monotonic() + 10
    while panes.is_alive(pane_id) and time.monotonic() < deadline:
        time.sleep(0.03)
    assert not panes.is_alive(pane_id)
    assert panes.pane(pane_id).dead  # remain-on-exit kept it for us

    panes.respawn(pane_id, SCRIPTED)
    wait_for_text(panes, pane_id, "scripted agent ready")
    assert panes.is_alive(pane_id)
    assert "DONE t1" not in panes.read_pane(pane_id, 500)  # old markers are gone


def test_errors_name_the_failure(panes):
    with pytest.raises(TmuxError, match="capture-pane"):
        panes.read_pane("%999")
    with pytest.raises(TmuxError, match="empty command"):
        panes.spawn("fleet-t", [])
    assert not panes.is_alive("%999")
    assert (
        PaneControl(libtmux.Server(socket_name=f"fleet-none-{uuid.uuid4().hex}")).list_panes() == []
    )
