"""Builds the store, dispatcher, quality gate and extractor from settings and the fleet file."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from fleet.clients.base import Dispatcher, Extractor, QualityGate
from fleet.clock import Clock, SystemClock
from fleet.errors import ConfigError
from fleet.fleetfile import FleetFile, load_fleet
from fleet.settings import FleetSettings
from fleet.store import Store, open_store

log = logging.getLogger("fleet.wiring")


@dataclass
class Components:
    settings: FleetSettings
    fleet: FleetFile
    store: Store
    dispatcher: Dispatcher
    gate: QualityGate
    extractor: Extractor | None
    clock: Clock
    # Settings pinned above the store by the environment or the FleetConfig block
    # (fleet/config_sources.py): their store value (e.g. max_concurrent) does not apply.
    pinned: frozenset[str] = frozenset()

    def describe(self) -> dict[str, str]:
        """What the run talks to, for logs and the UI (never credentials)."""
        return {
            "store": type(self.store).__name__,
            "dispatcher": type(self.dispatcher).__name__,
            "quality_gate": type(self.gate).__name__,
            "extractor": type(self.extractor).__name__ if self.extractor else "none (tier 2 off)",
        }


BlockLoader = Callable[[str], Any]


def _from_block(name: str, load_block: BlockLoader | None) -> Any:
    if load_block is None:
        raise ConfigError(
            f"block {name!r} is configured but blocks can only be loaded inside a flow run"
        )
    return load_block(name).get_client()


def build_store(settings: FleetSettings, load_block: BlockLoader | None = None) -> Store:
    if settings.store_block:
        return _from_block(settings.store_block, load_block)
    return open_store(settings.resolved_store_url(), settings=settings)


def aura_dispatcher(
    url: str, token: SecretStr | None, settings: FleetSettings, allow_insecure: bool = False
) -> Dispatcher:
    """The AuraGateway client as configured, whether from env vars or a Block."""
    from fleet.clients.aura import AuraGatewayDispatcher

    return AuraGatewayDispatcher(
        url,
        token,
        allow_insecure=allow_insecure or settings.allow_insecure_transport,
        timeout=settings.http_timeout_seconds,
        poll_initial=settings.gateway_poll_initial_seconds,
        poll_max=settings.gateway_poll_max_seconds,
    )


def hydra_gate(
    url: str, token: SecretStr | None, settings: FleetSettings, allow_insecure: bool = False
) -> QualityGate:
    """The Hydra client as configured, whether from env vars or a Block."""
    from fleet.clients.hydra import HydraGate

    return HydraGate(
        url,
        token,
        allow_insecure=allow_insecure or settings.allow_insecure_transport,
        timeout=settings.http_timeout_seconds,
    )


def build_dispatcher(
    settings: FleetSettings, load_block: BlockLoader | None = None, fleet: FleetFile | None = None
) -> Dispatcher:
    if settings.dispatcher == "mesh":
        from fleet.mesh.dispatcher import MeshDispatcher

        return MeshDispatcher.from_settings(settings, load_block)
    if settings.aura_block:
        return _from_block(settings.aura_block, load_block)
    if settings.aura_url:
        return aura_dispatcher(settings.aura_url, settings.aura_token, settings)
    from fleet.clients.local import LocalExecutor

    # Agents get the allowlist environment plus the fleet file's `env:`, never our secrets.
    return LocalExecutor(workdir=settings.home / "exec", env=fleet.env.resolve() if fleet else None)


def build_gate(
    settings: FleetSettings, fleet: FleetFile, load_block: BlockLoader | None = None
) -> QualityGate:
    if settings.hydra_block:
        return _from_block(settings.hydra_block, load_block)
    if settings.hydra_url:
        return hydra_gate(settings.hydra_url, settings.hydra_token, settings)
    from fleet.clients.local import LocalQualityGate

    checks = {a.id: (a.check, a.repo) for a in fleet.apps if a.check}
    return LocalQualityGate(checks, timeout=settings.check_timeout_seconds)


def build_extractor(
    settings: FleetSettings, load_block: BlockLoader | None = None
) -> Extractor | None:
    if settings.gemini_block:
        return _from_block(settings.gemini_block, load_block)
    if settings.gemini_api_key is None:
        return None
    if not settings.gemini_model:
        raise ConfigError(
            "GEMINI_API_KEY is set but no model is: set FLEET_GEMINI_MODEL "
            "(e.g. the current Gemini Flash model name) or unset the key to turn tier 2 off"
        )
    from fleet.clients.gemini import GeminiExtractor

    return GeminiExtractor(settings.gemini_api_key, settings.gemini_model)


def fleet_path(settings: FleetSettings, override: str | Path | None = None) -> Path:
    path = Path(override) if override else settings.fleet_file
    if path is None:
        raise ConfigError(
            "no fleet file: pass --fleet PATH, set FLEET_FLEET_FILE, or run `fleet demo` "
            "to create the demo fleet"
        )
    return path


_cache: dict[tuple, Components] = {}
_cache_lock = threading.Lock()


def components(
    settings: FleetSettings,
    fleet_file: str | Path | None = None,
    load_block: BlockLoader | None = None,
) -> Components:
    """One set of components per process and configuration, shared by every app run.

    `load_block(name)` returns a saved Prefect Block; the flows pass it, the core never
    imports Prefect.
    """
    path = fleet_path(settings, fleet_file).resolve()
    key = (settings.model_dump_json(), str(path))
    with _cache_lock:
        if key not in _cache:
            fleet = load_fleet(path)
            settings.home.mkdir(parents=True, exist_ok=True)
            _cache[key] = Components(
                settings=settings,
                fleet=fleet,
                store=build_store(settings, load_block),
                dispatcher=build_dispatcher(settings, load_block, fleet),
                gate=build_gate(settings, fleet, load_block),
                extractor=build_extractor(settings, load_block),
                clock=SystemClock(),
            )
            log.info("components: %s", _cache[key].describe())
            from fleet.mesh.open import share_breaker_states

            share_breaker_states(settings, load_block)  # the watchdog sees this process's breakers
        return _cache[key]


def reset_components() -> None:
    with _cache_lock:
        for comp in _cache.values():
            comp.store.close()
        _cache.clear()
