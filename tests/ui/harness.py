"""What the UI test drives: a real `prefect server` of its own, its REST API, headless Chromium."""

from __future__ import annotations

import html
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from deployments.server_settings import SERVER_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """The first truthy answer of `probe`: the server records task runs, logs and artifacts
    from events and batches, a moment after the run that made them."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s")
        time.sleep(0.5)


class PrefectServer:
    """`prefect server start` on a free port with its own PREFECT_HOME (its own SQLite)."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that talks to this server (and only to it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(SERVER_SETTINGS)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_LOGGING_TO_API_ENABLED="true",  # the session turns it off; the UI shows logs
        )
        env.update(extra)
        return env

    def start(self, timeout: float = 120.0) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start"]
                + ["--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prefect server did not come up on {self.url}:\n{tail}")
            time.sleep(0.5)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Api:
    """The few reads of Prefect's REST API the test makes (filters as the UI sends them)."""

    def __init__(self, api_url: str):
        self.client = httpx.Client(base_url=api_url, timeout=30)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        response = self.client.post(path, json=dict(body or {}))
        response.raise_for_status()
        return response.json()

    def flow_runs(self, flow: str) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}})

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )

    def logs(self, flow_run_id: str, min_level: int = 0) -> list[dict[str, Any]]:
        query = {"logs": {"flow_run_id": {"any_": [flow_run_id]}, "level": {"ge_": min_level}}}
        return self.post("/logs/filter", {**query, "limit": 200})

    def automations(self) -> list[dict[str, Any]]:
        return self.post("/automations/filter")

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class Page:
    """A UI page as headless Chromium rendered it: its visible text and a screenshot."""

    url: str
    text: str
    screenshot: Path


def render(
    chromium: str,
    url: str,
    screenshot: Path,
    until: Sequence[str] = (),
    attempts: int = 3,
    size: tuple[int, int] = (1400, 900),
) -> Page:
    """Load `url` in headless Chromium, let the JS app fetch and draw (virtual time), and keep
    both the DOM's text and a screenshot; loaded again (up to `attempts`) while some text of
    `until` is missing — on a busy machine a list may not be drawn within the budget."""
    for _ in range(attempts):
        result = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=15000",
                # Frames drawn under virtual time too: without it lists (Automations) stay empty.
                "--run-all-compositor-stages-before-draw",
                f"--screenshot={screenshot}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0 or not screenshot.exists():
            raise AssertionError(
                f"chromium failed on {url} ({result.returncode}): {result.stderr[-2000:]}"
            )
        page = Page(url, visible_text(result.stdout), screenshot)
        if all(text in page.text for text in until):
            break
    return page


def visible_text(dom: str) -> str:
    """The words a reader sees: tags, scripts and styles dropped, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def run_header(text: str, name: str) -> tuple[list[str], str]:
    """A flow run page's header: the tags shown after the run's name, and its state badge
    (the word before the start date: "Runs <name> <tags…> <State> 2026/11/30 …")."""
    found = re.search(rf"Runs {re.escape(name)} ((?:\S+ )*?)(\w+) \d{{4}}/\d\d/\d\d ", text)
    assert found, f"no run header for {name!r} in: {text[:600]}"
    return found.group(1).split(), found.group(2)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header; refuses anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height
