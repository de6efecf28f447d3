"""Every default of the design in one settings model, overridable by FLEET_* env vars."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class FleetSettings(BaseSettings):
    """Defaults come from DESIGN.md; set `FLEET_<NAME>` (e.g. FLEET_MAX_CONCURRENT=8) to override."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    # Where the embedded defaults keep their files.
    home: Path = Field(default=Path(".fleet"), description="state directory of the embedded defaults")
    fleet_file: Path | None = Field(default=None, description="the fleet file (apps, repos, commands)")
    store_url: str = Field(
        default="",
        description="sqlite:///path.db, postgresql://… or supabase; empty = <home>/fleet.db",
    )

    # Pipeline (DESIGN §3).
    skill_timeout_seconds: float = 3600
    review_timeout_seconds: float = 1800
    hydra_poll_seconds: float = 300
    hydra_hard_stop_seconds: float = 4 * 3600
    task_floor: int = 3
    max_tasks_per_stage: int = 500
    cohort_sizes: list[int] = [10, 20, 40]
    default_reward: float = 0.5
    # Default only: the live value is fleet_config.max_concurrent in the store (`fleet config`).
    max_concurrent: int = 4
    review_target: str = "mac4"
    review_model: str = "codex"
    ship_target: str = "mac1"
    ship_timeout_seconds: float = 1800
    evolve_attempts: int = 3
    check_timeout_seconds: float = 600
    stage_retries: int = 2
    retry_delay_seconds: float = 10
    # A run's claim on an app; renewed at every stage write and Hydra poll.
    app_lease_seconds: float = 3600 + 600
    # A fanned-out cohort reads its app runs' states this often (one API call for all of them).
    cohort_poll_seconds: float = 10
    # The deployment a fanned-out cohort submits each app to (prefect.yaml).
    app_deployment: str = "app-evolution/per-app"

    # Mesh (DESIGN §5).
    heartbeat_seconds: float = 30
    claim_seconds: float = 15
    orphan_claim_seconds: float = 10 * 60
    stuck_injection_seconds: float = 15 * 60
    task_expiry_seconds: float = 24 * 3600
    max_task_attempts: int = 3
    liveness_confirmations: int = 2
    agent_health_port: int = 9300
    # The host other machines reach an agent's health endpoint at (the watchdog probes it);
    # empty: this machine's FQDN when the endpoint binds every interface.
    agent_advertise_host: str = ""
    context_handoff_ratio: float = 0.85
    tmux_chunk_bytes: int = 200
    # Liveness probe: timeout of one health-endpoint check, and a known-good URL checked first
    # so that our own network failing is never taken for the other machine dying ("" = none).
    liveness_probe_timeout_seconds: float = 2
    liveness_reference_url: str = ""
    # Node agent (fleet/mesh/agent.py): the mesh it must belong to ("" = any), its panes
    # (one task each), how often its loop wakes, and how much pane history it reads.
    mesh_id: str = ""
    agent_panes: int = 2
    agent_tick_seconds: float = 1
    agent_capture_lines: int = 2000

    # Supervisor (DESIGN §7).
    supervisor_min_runtime_seconds: float = 10
    supervisor_max_failures: int = 5
    supervisor_status_port: int = 9000

    # Saved Prefect Blocks ("<block-type-slug>/<name>") that replace the settings below;
    # e.g. FLEET_AURA_BLOCK=fleet-aura-gateway/prod. Empty = not used.
    config_block: str = ""
    store_block: str = ""
    aura_block: str = ""
    hydra_block: str = ""
    gemini_block: str = ""

    # External systems. Empty URL = the embedded local default is used.
    aura_url: str = ""
    aura_token: SecretStr | None = None
    hydra_url: str = ""
    hydra_token: SecretStr | None = None
    supabase_url: str = ""
    supabase_key: SecretStr | None = None
    # Plain http:// to a non-loopback host, or TLS verification off, must be asked for by name.
    allow_insecure_transport: bool = False
    http_timeout_seconds: float = 30
    # AuraGateway task polling backs off from the first interval to the cap (not a fixed hammer).
    gateway_poll_initial_seconds: float = 2
    gateway_poll_max_seconds: float = 60
    breaker_failure_threshold: int = 5
    breaker_reset_seconds: float = 60

    # Tier-2 extraction: the model is configuration, never hard-coded; empty = tier 2 off.
    gemini_model: str = ""
    gemini_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FLEET_GEMINI_API_KEY", "GEMINI_API_KEY")
    )

    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.home / 'fleet.db'}"

    def cohort_size(self, completed_cohorts: int) -> int:
        """Progressive expansion: 10 → 20 → 40, then stays at the last size."""
        sizes = self.cohort_sizes or [10]
        return sizes[min(completed_cohorts, len(sizes) - 1)]


@lru_cache(maxsize=1)
def get_settings() -> FleetSettings:
    return FleetSettings()
