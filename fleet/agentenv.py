"""The environment agent commands run with: an allowlist, never the orchestrator's secrets."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What every agent gets from the orchestrator's environment: enough to find programs, a home
# for their config, a locale, a terminal and a temp dir. Nothing else is passed unless named.
ALLOWED_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TMPDIR", "TZ"}
)
ALLOWED_PREFIXES = ("LC_",)

# The orchestrator's own configuration (store URL, gateway tokens, Prefect API key): an
# agent never gets these, not even when a fleet file names them.
REFUSED_PREFIXES = ("FLEET_", "PREFECT_")
# Names that hold secrets: they may be passed by name from the orchestrator's environment
# (that is how an agent gets its own API key), never written as a value in a fleet file.
SECRET_NAME_RE = re.compile(
    r"TOKEN|SECRET|PASSW(OR)?D|(API|ACCESS|PRIVATE)_?KEY|CREDENTIAL|DSN|DATABASE_URL",
    re.IGNORECASE,
)
# A URL with a password in it (postgresql://user:pw@host) is a secret whatever its name.
SECRET_VALUE_RE = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE)

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_NAMES = 64
MAX_VALUE_CHARS = 4096


def allowed(name: str) -> bool:
    """Whether `name` is passed to every agent without being asked for."""
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)


def agent_env(
    extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The allowlisted variables of `base` (default: this process's environment) plus `extra`.

    `extra` is what the caller decided the agent needs (a fleet file's `env:`, resolved with
    `AgentEnv.resolve`); it is taken as given.
    """
    base = os.environ if base is None else base
    env = {name: value for name, value in base.items() if allowed(name)}
    env.update(extra or {})
    return env


def refusal(name: str, *, literal: bool) -> str | None:
    """Why `name` may not be given to agents (None: it may). `literal`: a value is written
    out in a config file rather than passed through from the orchestrator's environment."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return (
            f"{name!r:.70} is not an environment variable name: letters, digits and _, "
            "not starting with a digit, at most 128"
        )
    if name.upper().startswith(REFUSED_PREFIXES):
        prefixes = ", ".join(f"{prefix}*" for prefix in REFUSED_PREFIXES)
        return f"{name} is the orchestrator's own setting ({prefixes}): agents never get it"
    if literal and SECRET_NAME_RE.search(name):
        return (
            f"{name} looks like a secret: its value may not be written out, only passed "
            "through by name from the orchestrator's environment (env.pass)"
        )
    return None


class AgentEnv(BaseModel):
    """The fleet file's `env:`: what agent commands get besides the allowlist.

    `pass`: names whose values are taken from the orchestrator's environment when a command
    starts (a name that is not set there is left out). `set`: fixed values, written in the
    file, so never secrets.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    pass_: list[str] = Field(default_factory=list, alias="pass", max_length=MAX_NAMES)
    set: dict[str, str] = Field(default_factory=dict, max_length=MAX_NAMES)

    @field_validator("pass_")
    @classmethod
    def _passable(cls, names: list[str]) -> list[str]:
        _check_names(names, literal=False)
        return names

    @field_validator("set")
    @classmethod
    def _settable(cls, values: dict[str, str]) -> dict[str, str]:
        _check_names(values, literal=True)
        for name, value in values.items():
            if len(value) > MAX_VALUE_CHARS:
                raise ValueError(f"the value of {name} is over {MAX_VALUE_CHARS} characters")
            if SECRET_VALUE_RE.search(value):
                raise ValueError(
                    f"the value of {name} is a URL with a password in it: do not "
                    "write it in the file; list the name under env.pass instead"
                )
        return values

    @model_validator(mode="after")
    def _once(self) -> AgentEnv:
        both = sorted(set(self.pass_) & set(self.set))
        if both:
            raise ValueError(f"{', '.join(both)} given under both pass and set; keep one")
        return self

    def resolve(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The `extra` for agent_env: the passed names found in `base` (default: this
        process's environment), then the fixed values."""
        base = os.environ if base is None else base
        passed = {name: base[name] for name in self.pass_ if name in base}
        return {**passed, **self.set}


def _check_names(names: Iterable[str], *, literal: bool) -> None:
    for name in names:
        reason = refusal(name, literal=literal)
        if reason:
            raise ValueError(reason)
