"""Domain models: app ids, pipeline stages and their transitions, tasks, states, trajectories."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from fleet.errors import InvalidAppId, InvalidTransition

APP_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def validate_app_id(value: object) -> str:
    if not isinstance(value, str) or not APP_ID_RE.fullmatch(value):
        raise InvalidAppId(value)
    return value


AppId = Annotated[str, AfterValidator(validate_app_id)]


class Stage(str, Enum):
    QUEUED = "queued"
    SKILL_RUNNING = "skillRunning"
    SKILL_COMPLETE = "skillComplete"
    ADVERSARIAL_RUNNING = "adversarialRunning"
    ADVERSARIAL_COMPLETE = "adversarialComplete"
    HYDRA_BUILD = "hydraBuild"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def order(self) -> int:
        return _ORDER[self]

    def before(self, other: Stage) -> bool:
        """True while this stage has not yet reached `other` in the pipeline."""
        return self.order < other.order

    @property
    def terminal(self) -> bool:
        return self in (Stage.COMPLETE, Stage.FAILED)

    def can_move_to(self, new: Stage) -> bool:
        return new in ALLOWED_TRANSITIONS[self]


_ORDER = {stage: i for i, stage in enumerate(Stage)}
_ORDER[Stage.FAILED] = _ORDER[Stage.COMPLETE]

# Rewriting the current stage is allowed (idempotent retries); any live stage can fail;
# a finished app goes back to the queue only when an operator asks for a fresh run.
ALLOWED_TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.QUEUED: frozenset({Stage.QUEUED, Stage.SKILL_RUNNING, Stage.FAILED}),
    Stage.SKILL_RUNNING: frozenset({Stage.SKILL_RUNNING, Stage.SKILL_COMPLETE, Stage.FAILED}),
    Stage.SKILL_COMPLETE: frozenset(
        {Stage.SKILL_COMPLETE, Stage.ADVERSARIAL_RUNNING, Stage.FAILED}
    ),
    Stage.ADVERSARIAL_RUNNING: frozenset(
        {Stage.ADVERSARIAL_RUNNING, Stage.ADVERSARIAL_COMPLETE, Stage.FAILED}
    ),
    Stage.ADVERSARIAL_COMPLETE: frozenset(
        {Stage.ADVERSARIAL_COMPLETE, Stage.HYDRA_BUILD, Stage.FAILED}
    ),
    Stage.HYDRA_BUILD: frozenset({Stage.HYDRA_BUILD, Stage.COMPLETE, Stage.FAILED}),
    Stage.COMPLETE: frozenset({Stage.COMPLETE, Stage.QUEUED}),
    Stage.FAILED: frozenset({Stage.FAILED, Stage.QUEUED}),
}


def check_transition(current: Stage, new: Stage) -> None:
    if not current.can_move_to(new):
        allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[current]))
        raise InvalidTransition(
            f"stage {current.value} cannot move to {new.value}; allowed: {allowed}"
        )


Source = Literal["skill", "adversarial"]
Severity = Literal["critical", "high", "medium", "low"]
Outcome = Literal["success", "failure"]
SEVERITY_PRIORITY: dict[str, int] = {"critical": 1, "high": 2, "medium": 3, "low": 4}
MAX_DESCRIPTION = 500
MAX_FILE = 512


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Task(BaseModel):
    """One actionable change for an app, from the skill (PARSE) or the adversarial review."""

    app_id: AppId
    source: Source = "skill"
    priority: int = Field(
        default=3, ge=1, le=5, description="1 = critical blocker, 5 = nice-to-have"
    )
    description: str = Field(min_length=1, max_length=MAX_DESCRIPTION)
    severity: Severity | None = None
    file: str | None = Field(default=None, max_length=MAX_FILE)

    @field_validator("description", mode="before")
    @classmethod
    def _single_line(cls, value: object) -> object:
        return _one_line(value) if isinstance(value, str) else value

    @field_validator("file", mode="before")
    @classmethod
    def _clean_file(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if "\x00" in value:
                raise ValueError("file path contains a NUL byte")
            return value or None
        return value

    @property
    def key(self) -> str:
        """Stable identity: rerunning a stage upserts the same rows instead of adding new ones."""
        basis = "\x1f".join(
            [self.app_id, self.source, (self.file or "").lower(), self.description.lower()]
        )
        return hashlib.sha256(basis.encode()).hexdigest()[:32]


class EvolutionState(BaseModel):
    app_id: AppId
    stage: Stage = Stage.QUEUED
    error: str | None = None
    epoch: int = 0
    owner: str | None = None
    lease_until: datetime | None = None
    stage_started_at: datetime | None = None
    updated_at: datetime | None = None
    run_id: str | None = None


class Trajectory(BaseModel):
    """One finished run of an app, the evidence DISCOVER ranks on (KARL)."""

    app_id: AppId
    run_id: str
    pipeline: str = "default"
    skill_tasks: int = 0
    adversarial_issues: int = 0
    quality_score: float | None = None
    outcome: Outcome
    reward: float = Field(ge=0.0, le=1.0)
    durations: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    created_at: datetime | None = None


class FleetConfig(BaseModel):
    """Knobs other tools may edit at run time; the store holds the live copy.

    None means "not set in the store": the settings' default applies.
    """

    max_concurrent: int | None = Field(default=None, ge=1, le=1000)
