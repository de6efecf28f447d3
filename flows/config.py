"""Resolves what a flow run talks to: settings, the FleetConfig block and saved client Blocks,
by the one precedence rule of fleet/config_sources.py (environment > block > store > default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

from prefect.blocks.core import Block

# Imported so Block.load("<slug>/<name>") finds every block type the engine defines.
import blocks.fleet_config  # noqa: F401
import blocks.integrations  # noqa: F401
import blocks.store  # noqa: F401
from blocks.fleet_config import FleetConfigBlock
from fleet.config_sources import Sourced, config_sources, effective_settings
from fleet.errors import ConfigError
from fleet.ledger import current_cohort
from fleet.settings import FleetSettings, get_settings
from fleet.wiring import Components, components

log = logging.getLogger("fleet.config")


def _load_block(name: str) -> Block:
    # Runs in a worker thread inside an async flow run: ask Prefect for its sync path. Prefect's
    # async_dispatch wrapper takes `_sync` but its declared signature omits it, hence the cast.
    load = cast(Callable[..., Block], Block.load)
    return load(name, _sync=True)


def load_config_block(name: str) -> FleetConfigBlock:
    """The FleetConfig block `name` (`fleet-config/<name>`), or a ConfigError saying why not."""
    try:
        block = _load_block(name)
    except ValueError as exc:  # Prefect's "Unable to find block document named …"
        raise ConfigError(
            f"FLEET_CONFIG_BLOCK={name}: {str(exc).splitlines()[0]} — create it in the UI "
            "(Blocks → + → Fleet Config) or unset FLEET_CONFIG_BLOCK"
        ) from None
    if not isinstance(block, FleetConfigBlock):
        raise ConfigError(f"block {name!r} is a {type(block).__name__}, not a fleet-config block")
    return block


def layered(
    settings: FleetSettings,
    env: Mapping[str, str],
    block: FleetConfigBlock | None,
    store: Mapping[str, Any] | None = None,
) -> dict[str, Sourced]:
    """Every setting with its value and source (the store's layer only when given)."""
    return config_sources(settings, env, store or {}, block.fields() if block else None)


def resolve(
    settings: FleetSettings,
    env: Mapping[str, str],
    block: FleetConfigBlock | None,
    fleet_file: str | None,
    load_block: Callable[[str], Any] | None = None,
) -> Components:
    """The run's components: the environment and the block applied to the settings; the
    store's knobs stay live (read at each claim) unless a higher layer pins them. A fleet
    file the run passes beats every layer; else FLEET_FLEET_FILE, else the block's."""
    sources = layered(settings, env, block)
    comp = components(effective_settings(settings, sources), fleet_file or None, load_block)
    pinned = frozenset(n for n, s in sources.items() if s.source in ("environment", "block"))
    return dataclasses.replace(comp, pinned=pinned)


def _resolve(fleet_file: str | None) -> Components:
    settings: FleetSettings = get_settings()
    block = load_config_block(settings.config_block) if settings.config_block else None
    return resolve(settings, os.environ, block, fleet_file, _load_block)


def _cohort_run() -> str | None:
    """The flow run this one works for: the root of its run tree (a fanned-out app run's
    cohort run), for the work ledger. Blocking API reads: call it on a thread."""
    from prefect.runtime import flow_run

    if not flow_run.get_id():
        return None
    try:
        return flow_run.get_root_flow_run_id()
    except Exception as exc:  # attribution only: the run goes on, its tries count for itself
        log.warning("could not read this run's root flow run (%s); the ledger uses its own", exc)
        return None


async def flow_components(fleet_file: str | None) -> Components:
    comp = await asyncio.to_thread(_resolve, fleet_file)
    cohort = await asyncio.to_thread(_cohort_run)
    if cohort:
        current_cohort.set(cohort)
    return comp
