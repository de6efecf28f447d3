"""The fleet file: which apps exist, where their repos are, and the agent commands per stage."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet.configfile import load_model
from fleet.models import AppId

PLACEHOLDERS = ("{app_id}", "{pipeline}", "{repo}", "{prompt}")


class Commands(BaseModel):
    """Argument-list templates; each placeholder fills one argument and never meets a shell."""

    model_config = ConfigDict(extra="forbid")

    skill: list[str] = Field(min_length=1)
    review: list[str] = Field(min_length=1)
    evolve: list[str] = Field(min_length=1, description="the /meta:hydra analogue: evolves the app")
    ship: list[str] = Field(min_length=1, description="archive + upload, dispatched to the ship target")


class AppSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: AppId
    repo: Path | None = Field(default=None, description="local checkout; enables the change guard")
    check: list[str] | None = Field(default=None, description="quality check command run in repo")
    protected: list[str] = Field(default_factory=list, description="globs agents may never change")
    pipeline: str = "default"


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "fleet"
    commands: Commands
    protected: list[str] = Field(default_factory=list, description="globs protected in every app")
    apps: list[AppSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> FleetFile:
        seen: set[str] = set()
        for app in self.apps:
            if app.id in seen:
                raise ValueError(f"app id {app.id!r} appears twice; ids must be unique")
            seen.add(app.id)
        return self

    def app(self, app_id: str) -> AppSpec:
        for spec in self.apps:
            if spec.id == app_id:
                return spec
        raise KeyError(app_id)

    @property
    def app_ids(self) -> list[str]:
        return [a.id for a in self.apps]

    def resolved(self, base: Path) -> FleetFile:
        """Relative repo paths are relative to the fleet file's directory."""
        apps = [
            a.model_copy(update={"repo": (base / a.repo).resolve()}) if a.repo else a
            for a in self.apps
        ]
        return self.model_copy(update={"apps": apps})


def load_fleet(path: Path) -> FleetFile:
    path = Path(path)
    return load_model(path, FleetFile, what="fleet file").resolved(path.parent)


_PLACEHOLDER = re.compile(r"\{(app_id|pipeline|repo|prompt)\}")


def render(template: list[str], **values: str) -> list[str]:
    """Fill {app_id}, {pipeline}, {repo}, {prompt} in one pass, one argv item each.

    No str.format and no second pass: a value holding braces is never re-read as a
    placeholder. An argument that is only a placeholder with an empty value is dropped.
    """
    out = []
    for arg in template:
        filled = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), arg)
        if filled or not _PLACEHOLDER.fullmatch(arg):
            out.append(filled)
    return out
