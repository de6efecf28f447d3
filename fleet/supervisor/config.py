"""supervisor.yaml: pydantic models and a loader whose errors name the file, line and key path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet.configfile import KeyLines, dotted, line_of, load_model
from fleet.supervisor.archive import KEEP_COMMITS

RestartPolicy = Literal["always", "on-failure", "never"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backoff(_Strict):
    """Delay before a restart: initial, doubled per quick crash, capped at max."""

    initial_seconds: float = Field(default=1.0, gt=0)
    max_seconds: float = Field(default=30.0, gt=0)
    # A run this long counts as healthy: the next crash starts again from `initial_seconds`.
    reset_after_seconds: float = Field(default=30.0, ge=0)


class Intensity(_Strict):
    """OTP restart intensity: more than max_restarts within period_seconds → give up."""

    max_restarts: int = Field(default=5, ge=0)
    period_seconds: float = Field(default=60.0, gt=0)


class Health(_Strict):
    """Limits sampled via psutil over the whole process tree; exceeding one restarts the process."""

    interval_seconds: float = Field(default=5.0, gt=0)
    max_memory_mb: float | None = Field(default=None, gt=0)
    max_cpu_percent: float | None = Field(default=None, gt=0)
    # CPU spikes are normal: only this many consecutive samples over the limit count.
    cpu_samples: int = Field(default=3, ge=1)


class AppHealth(Health):
    """The seed's health checks for the supervised app: every 5 s, 4 096 MB, 90 % CPU.

    Setting one limit keeps the others; `null` switches a limit off.
    """

    max_memory_mb: float | None = Field(default=4096, gt=0)
    max_cpu_percent: float | None = Field(default=90, gt=0)


APP_HEALTH = AppHealth()


class ProcessSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    command: list[str] = Field(min_length=1)
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    restart: RestartPolicy = "on-failure"
    backoff: Backoff = Field(default_factory=Backoff)
    intensity: Intensity = Field(default_factory=Intensity)
    health: Health = Field(default_factory=Health)
    stop_timeout_seconds: float = Field(5.0, gt=0)
    log_file: Path | None = None

    @field_validator("command")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("the program (first element) is empty")
        return v


class AppSpec(_Strict):
    """An app repo run under the run rules (optional)."""

    repo: Path
    command: list[str] = Field(min_length=1)
    protected: list[str] = Field(default_factory=list)
    check_command: list[str] | None = None
    min_runtime_seconds: float | None = Field(None, gt=0)
    max_failures: int | None = Field(None, ge=1)
    # Snapshots whose commits are kept outside the repo; older ones are pruned.
    keep_commits: int = Field(KEEP_COMMITS, ge=1)
    # A breach stops the app; in the first run after a change it also rolls the change back.
    health: AppHealth = Field(default_factory=AppHealth)


class SupervisorConfig(_Strict):
    status_host: str = "127.0.0.1"
    status_port: int | None = Field(None, ge=0, le=65535)  # None = settings.supervisor_status_port
    processes: list[ProcessSpec] = Field(default_factory=list)
    app: AppSpec | None = None

    @field_validator("processes")
    @classmethod
    def _unique_names(cls, v: list[ProcessSpec]) -> list[ProcessSpec]:
        seen: set[str] = set()
        for spec in v:
            if spec.name in seen:
                raise ValueError(f"duplicate process name {spec.name!r}; names must be unique")
            seen.add(spec.name)
        return v


def load_config(path: Path | str) -> SupervisorConfig:
    """Load and validate supervisor.yaml.

    Raises ConfigError 'file:line: key.path: what was expected'.
    """
    config = load_model(
        path,
        SupervisorConfig,
        what="supervisor config",
        extra_errors=_duplicates,
        # Reported by _duplicates at the repeated entry's own line instead.
        skip_error=lambda e: e["type"] == "value_error" and "duplicate process name" in e["msg"],
    )
    return _resolve_paths(config, Path(path).parent)


def _duplicates(shown: str, data: dict, lines: KeyLines) -> list[tuple[int, str]]:
    """Duplicate names, reported at the later entry's line (the model alone cannot say where)."""
    seen: dict[str, int] = {}
    found = []
    for i, entry in enumerate(data.get("processes") or []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            loc = ("processes", i, "name")
            found.append(
                (
                    line_of(loc, lines),
                    f"{shown}:{line_of(loc, lines)}: {dotted(loc)}: duplicate process "
                    f"name {name!r} (first at processes[{seen[name]}]); names must be unique",
                )
            )
        seen.setdefault(name, i)
    return found


def _resolve_paths(config: SupervisorConfig, base: Path) -> SupervisorConfig:
    """Relative cwd/log_file/repo are relative to the config file, not to where it is loaded
    from."""

    def rel(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    processes = [
        p.model_copy(update={"cwd": rel(p.cwd), "log_file": rel(p.log_file)})
        for p in config.processes
    ]
    app = config.app.model_copy(update={"repo": rel(config.app.repo)}) if config.app else None
    return config.model_copy(update={"processes": processes, "app": app})
