"""Resolves what a flow run talks to: settings + the fleet-config Block + saved client Blocks."""

from __future__ import annotations

import asyncio

from prefect.blocks.core import Block

# Imported so Block.load("<slug>/<name>") finds every block type the engine defines.
import blocks.fleet_config  # noqa: F401
import blocks.integrations  # noqa: F401
import blocks.store  # noqa: F401
from fleet.models import FleetConfig
from fleet.settings import FleetSettings, get_settings
from fleet.wiring import Components, components


def _load_block(name: str) -> Block:
    # Runs in a worker thread inside an async flow run: ask Prefect for its sync path.
    return Block.load(name, _sync=True)


def _resolve(fleet_file: str | None) -> Components:
    settings: FleetSettings = get_settings()
    config = None
    if settings.config_block:
        config = _load_block(settings.config_block)
        settings = config.apply(settings)
    comp = components(settings, fleet_file or getattr(config, "fleet_file", None), _load_block)
    if config is not None and config.max_concurrent is not None:
        current = comp.store.get_fleet_config()
        if current.max_concurrent != config.max_concurrent:
            comp.store.set_fleet_config(FleetConfig(max_concurrent=config.max_concurrent))
    return comp


async def flow_components(fleet_file: str | None) -> Components:
    return await asyncio.to_thread(_resolve, fleet_file)
