"""The fleet file: which apps exist, where their repos are, and the agent commands per stage."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from fleet.agentenv import AgentEnv, agent_env
from fleet.configfile import load_model
from fleet.models import AppId

PLACEHOLDERS = ("{app_id}", "{pipeline}", "{repo}", "{prompt}")

# Bounds on what a fleet file may hold: far above any real fleet, far below harm.
MAX_APPS = 5000
MAX_ARGS = 64
MAX_ARG_CHARS = 4096
MAX_GLOBS = 256
MAX_PATH_CHARS = 1024

Arg = Annotated[str, StringConstraints(max_length=MAX_ARG_CHARS)]
Argv = Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGS)]
Glob = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH_CHARS)]
Globs = Annotated[list[Glob], Field(max_length=MAX_GLOBS)]
# Shown in tables and filled into commands: one short printable line.
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class Commands(BaseModel):
    """Argument-list templates; each placeholder fills one argument and never meets a shell."""

    model_config = ConfigDict(extra="forbid")

    skill: Argv
    review: Argv
    evolve: Argv = Field(description="the /meta:hydra analogue: evolves the app")
    ship: Argv = Field(description="archive + upload, dispatched to the ship target")


class AppSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: AppId
    repo: Path | None = Field(default=None, description="local checkout; enables the change guard")
    check: Argv | None = Field(default=None, description="quality check command run in repo")
    protected: Globs = Field(default_factory=list, description="globs agents may never change")
    pipeline: Label = "default"

    @field_validator("repo")
    @classmethod
    def _short_repo(cls, repo: Path | None) -> Path | None:
        if repo is not None and len(str(repo)) > MAX_PATH_CHARS:
            raise ValueError(f"over {MAX_PATH_CHARS} characters")
        return repo


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Label = "fleet"
    repo_root: Path | None = Field(
        default=None,
        description="every app's repo must resolve inside this directory "
        "(relative to the fleet file); default: the fleet file's own directory",
    )
    commands: Commands
    protected: Globs = Field(default_factory=list, description="globs protected in every app")
    env: AgentEnv = Field(
        default_factory=AgentEnv,
        description="what agent commands get "
        "besides PATH, HOME, LANG, LC_*, TERM, TMPDIR (see fleet/agentenv.py)",
    )
    apps: list[AppSpec] = Field(min_length=1, max_length=MAX_APPS)

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
        """Relative repo paths (and repo_root) are relative to the fleet file's directory."""
        apps = [
            a.model_copy(update={"repo": (base / a.repo).resolve()}) if a.repo else a
            for a in self.apps
        ]
        return self.model_copy(update={"apps": apps, "repo_root": self.root(base)})

    def root(self, base: Path) -> Path:
        """The directory every repo must resolve inside."""
        return (base / self.repo_root).resolve() if self.repo_root else base.resolve()

    def outside_root(self, base: Path) -> list[tuple[tuple, str]]:
        """Repos that resolve (symlinks followed) outside the root: an agent is let loose
        in its repo, so `repo: ../../etc` must not reach beyond what the operator chose."""
        root = self.root(base)
        return [
            (
                ("apps", i, "repo"),
                f"{str(app.repo)!r:.80} resolves outside {root}; keep repos "
                "under the fleet file's directory or set repo_root",
            )
            for i, app in enumerate(self.apps)
            if app.repo is not None and not (base / app.repo).resolve().is_relative_to(root)
        ]

    def agent_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment agent commands run with: the allowlist plus this file's `env:`."""
        return agent_env(self.env.resolve(base), base)


def load_fleet(path: Path) -> FleetFile:
    path = Path(path)
    base = path.parent
    fleet = load_model(path, FleetFile, what="fleet file", after=lambda f: f.outside_root(base))
    return fleet.resolved(base)


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
