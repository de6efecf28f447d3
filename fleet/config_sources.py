"""Where each setting's value comes from: one precedence rule for env, block, store and defaults.

The rule, highest first:

1. **environment** — `FLEET_<NAME>` set for this process (a shell, a worker, a deployment's
   job variables): the most local and most deliberate choice, as in every 12-factor tool.
2. **block** — the FleetConfig block named by `FLEET_CONFIG_BLOCK`: the operator's
   fleet-wide pin, edited in the Prefect UI.
3. **store** — the store's `fleet_config` row: the live knob `fleet config` and the
   dashboard turn between runs.
4. **default** — the value DESIGN.md gives (fleet/settings.py).

A higher layer pins a value: a write to a lower layer (e.g. `fleet config
set-max-concurrent` while the block sets it) would change nothing, so `fleet config`
refuses it with `shadowed_write`'s one line (which layer wins, how to change it there).
A run's own parameters (e.g. `fleet_file`) beat all four for that run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasChoices, SecretStr

from fleet.settings import FleetSettings

Source = Literal["environment", "block", "store", "default"]
PRECEDENCE: tuple[Source, ...] = ("environment", "block", "store", "default")
SECRET_SHOWN = "********"


@dataclass(frozen=True)
class Sourced:
    """One setting's effective value, the layer it came from, and the layers it shadows."""

    name: str
    value: Any
    source: Source
    env_vars: tuple[str, ...]
    shadowed: tuple[Source, ...] = ()  # lower layers that also set it, and do not apply

    @property
    def shown(self) -> Any:
        """The value for display: secrets masked, paths as text."""
        if isinstance(self.value, SecretStr):
            return SECRET_SHOWN
        return (
            self.value
            if self.value is None or isinstance(self.value, (bool, int, float, str, list))
            else str(self.value)
        )


def env_vars(name: str) -> tuple[str, ...]:
    """The environment variables that set the setting `name` (FLEET_<NAME> or its aliases)."""
    field = FleetSettings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(choice) for choice in alias.choices)
    prefix = FleetSettings.model_config.get("env_prefix", "")
    return (f"{prefix}{name}".upper(),)


def config_sources(
    settings: FleetSettings,
    env: Mapping[str, str],
    store: Mapping[str, Any],
    block: Mapping[str, Any] | None = None,
) -> dict[str, Sourced]:
    """Every setting with its effective value and source, in settings order.

    `settings` was built from `env` (so env values arrive parsed exactly as the engine
    parses them); `store` is the store's fleet_config and `block` the FleetConfig block's
    fields, None meaning "not set" in both.
    """
    present = {k.upper() for k, v in env.items() if v is not None}
    layers: dict[Source, Mapping[str, Any]] = {
        "block": {k: v for k, v in (block or {}).items() if v is not None},
        "store": {k: v for k, v in store.items() if v is not None},
    }
    resolved: dict[str, Sourced] = {}
    for name, field in FleetSettings.model_fields.items():
        names = env_vars(name)
        setters: list[tuple[Source, Any]] = []
        if any(var.upper() in present for var in names):
            setters.append(("environment", getattr(settings, name)))
        for source in ("block", "store"):
            if name in layers[source]:
                setters.append((source, layers[source][name]))
        default = field.get_default(call_default_factory=True)
        source, value = setters[0] if setters else ("default", default)
        resolved[name] = Sourced(name, value, source, names, tuple(s for s, _ in setters[1:]))
    return resolved


def effective_settings(settings: FleetSettings, sources: Mapping[str, Sourced]) -> FleetSettings:
    """`settings` with the block's and the store's values applied where they win."""
    update = {name: s.value for name, s in sources.items() if s.source in ("block", "store")}
    return FleetSettings.model_validate({**settings.model_dump(), **update})


def shadowed_write(
    sources: Mapping[str, Sourced], name: str, layer: Source = "store", block_name: str = ""
) -> str | None:
    """Why a write of `name` to `layer` would not take effect (one line), or None if it would."""
    current = sources[name]
    if PRECEDENCE.index(current.source) >= PRECEDENCE.index(layer):
        return None
    if current.source == "environment":
        where = f"the environment ({' or '.join(current.env_vars)})"
        fix = f"unset {current.env_vars[0]} where the runs start, or set it there"
    else:
        where = f"the FleetConfig block {block_name!r}" if block_name else "the FleetConfig block"
        fix = "change it in the block (Prefect UI → Blocks), or clear the field there first"
    return f"{name} is pinned to {current.shown!r} by {where}, which wins over the {layer}: {fix}"
