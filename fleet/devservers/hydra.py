"""A Hydra-compatible dev server: per-app status set by hand or computed by a check command."""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.agentenv import agent_env
from fleet.devservers.base import DevServer, Reply

log = logging.getLogger("fleet.devservers.hydra")

TAIL = 1000


@dataclass
class AppStatus:
    phase: str = "evolving"
    cycle: int = 0
    quality: dict[str, Any] = field(default_factory=lambda: {"isPassing": False, "score": 0.0})
    check: list[str] | None = None  # argv run on every status read; exit 0 = passing
    cwd: str | None = None
    check_timeout: float = 60


class HydraDevServer(DevServer):
    """`GET /status/{app_id}` → `{phase, cycle, quality: {isPassing, score, ...}}`.

    Set an app's status with `set_status` / `set_check`, or over HTTP with
    `PUT /_admin/apps/{app_id}` and a body of `{phase, cycle, quality}` or
    `{"check": [argv...], "cwd": ...}`. Unknown apps answer 404. Check commands run with the
    agent allowlist environment plus `env` (fleet/agentenv.py), never this process's own.
    """

    name = "hydra"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        env: dict[str, str] | None = None,
    ):
        super().__init__(host, port, token)
        self.env = env
        self._apps: dict[str, AppStatus] = {}
        self._lock = threading.Lock()
        self.route("GET", r"/status/(?P<app_id>[^/]+)", self._status)
        self.route("PUT", r"/_admin/apps/(?P<app_id>[^/]+)", self._admin_set)

    # -- Python API --------------------------------------------------------------------------

    def set_status(
        self,
        app_id: str,
        *,
        phase: str = "evolving",
        cycle: int = 0,
        is_passing: bool = False,
        score: float | None = None,
        **quality: Any,
    ) -> None:
        with self._lock:
            self._apps[app_id] = AppStatus(
                phase=phase,
                cycle=cycle,
                quality={"isPassing": is_passing, "score": score, **quality},
            )

    def set_check(
        self, app_id: str, argv: list[str], *, cwd: str | Path | None = None, timeout: float = 60
    ) -> None:
        """Every status read of `app_id` runs `argv` (no shell): exit 0 passes, else not."""
        if (
            not isinstance(argv, (list, tuple))
            or not argv
            or not all(isinstance(a, str) for a in argv)
        ):
            raise ValueError("check must be a non-empty argument list of strings")
        with self._lock:
            self._apps[app_id] = AppStatus(
                check=list(argv), cwd=str(cwd) if cwd else None, check_timeout=timeout
            )

    def forget(self, app_id: str) -> None:
        with self._lock:
            self._apps.pop(app_id, None)

    # -- routes ------------------------------------------------------------------------------

    def _status(self, params: dict, body: Any) -> dict:
        app_id = params["app_id"]
        with self._lock:
            app = self._apps.get(app_id)
        if app is None:
            raise Reply(404, {"error": f"no Hydra run for app {app_id!r}"})
        if app.check is not None:
            self._run_check(app)
        return {
            "app_id": app_id,
            "phase": app.phase,
            "cycle": app.cycle,
            "quality": dict(app.quality),
        }

    def _run_check(self, app: AppStatus) -> None:
        assert app.check is not None
        try:
            done = subprocess.run(
                app.check,
                cwd=app.cwd,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=app.check_timeout,
                stdin=subprocess.DEVNULL,
                env=agent_env(self.env),
            )
            passing, code = done.returncode == 0, done.returncode
            tail = ((done.stdout or "") + (done.stderr or "")).strip()[-TAIL:]
        except subprocess.TimeoutExpired:
            passing, code, tail = False, None, f"check timed out after {app.check_timeout:g} s"
        except OSError as exc:
            passing, code = False, None
            tail = f"cannot run check {app.check[0]!r}: {exc.strerror or exc}"
        with self._lock:
            app.cycle += 1
            app.phase = "complete" if passing else "evolving"
            app.quality = {
                "isPassing": passing,
                "score": 1.0 if passing else 0.0,
                "exitCode": code,
                "output": tail,
            }

    def _admin_set(self, params: dict, body: Any) -> dict:
        app_id = params["app_id"]
        if not isinstance(body, dict):
            raise Reply(400, {"error": "body must be a JSON object"})
        if "check" in body:
            try:
                self.set_check(
                    app_id,
                    body["check"],
                    cwd=body.get("cwd"),
                    timeout=float(body.get("timeout", 60)),
                )
            except (TypeError, ValueError) as exc:
                raise Reply(400, {"error": str(exc)}) from None
            return {"app_id": app_id, "check": body["check"]}
        quality = body.get("quality") or {}
        if not isinstance(body.get("phase", ""), str) or not isinstance(quality, dict):
            expected = '{"phase": str, "cycle": int, "quality": {"isPassing": bool, ...}}'
            raise Reply(400, {"error": f"expected {expected}"})
        with self._lock:
            self._apps[app_id] = AppStatus(
                phase=body.get("phase", "evolving"),
                cycle=int(body.get("cycle", 0)),
                quality=dict(quality),
            )
        return {"app_id": app_id, "phase": self._apps[app_id].phase}
