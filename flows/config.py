"""Resolves what a flow run talks to: settings + the fleet-config Block + saved client Blocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from prefect.blocks.core import Block

# Imported so Block.load("<slug>/<name>") finds every block type the engine defines.
import blocks.fleet_config  # noqa: F401
import blocks.integrations  # noqa: F401
import blocks.store  # noqa: F401
from blocks.fleet_config import FleetConfigBlock
from fleet.errors import ConfigError
from fleet.models import FleetConfig
from fleet.settings import FleetSettings, get_settings
from fleet.wiring import Components, components


def _load_block(name: str) -> Block:
    # Runs in a worker thread inside an async flow run: ask Prefect for its sync path. Prefect's
    # async_dispatch wrapper takes `_sync` but its declared signature omits it, hence the cast.
    load = cast(Callable[..., Block], Block.load)
    return load(name, _sync=True)


def _load_config(name: str) -> FleetConfigBlock:
    block = _load_block(name)
    if not isinstance(block, FleetConfigBlock):
        raise ConfigError(f"block {name!r} is a {type(block).__name__}, not a fleet-config block")
    return block


def _resolve(fleet_file: str | None) -> Components:
    settings: FleetSettings = get_settings()
    config: FleetConfigBlock | None = None
    if settings.config_block:
        config = _load_config(settings.config_block)
        settings = config.apply(settings)
    comp = components(settings, fleet_file or getattr(config, "fleet_file", None), _load_block)
    if config is not None and config.max_concurrent is not None:
        current = comp.store.get_fleet_config()
        if current.max_concurrent != config.max_concurrent:
            comp.store.set_fleet_config(FleetConfig(max_concurrent=config.max_concurrent))
    return comp


async def flow_components(fleet_file: str | None) -> Components:
    return await asyncio.to_thread(_resolve, fleet_file)
