"""Every default of the design in one settings model, overridable by FLEET_* env vars."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class FleetSettings(BaseSettings):
    """Defaults come from DESIGN.md; `FLEET_<NAME>` (e.g. FLEET_MAX_CONCURRENT=8) overrides one."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    # Where the embedded defaults keep their files.
    home: Path = Field(
        default=Path(".fleet"), description="state directory of the embedded defaults"
    )
    fleet_file: Path | None = Field(
        default=None, description="the fleet file (apps, repos, commands)"
    )
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
    # Dollars the open cohort may spend (the agents' COST: reports in the work ledger) before
    # cohort runs stop starting apps; running apps finish. None = no budget.
    cohort_budget_usd: float | None = Field(default=None, ge=0)
    review_target: str = "mac4"
    review_model: str = "codex"
    ship_target: str = "mac1"
    ship_timeout_seconds: float = 1800
    evolve_attempts: int = 3
    check_timeout_seconds: float = 600
    stage_retries: int = 2
    retry_delay_seconds: float = 10
    # A run's claim on an app: a short lease renewed by the run's heartbeat
    # (Store.renew_claim), so the app of a dead run is free again within one lease.
    app_lease_seconds: float = 60
    app_heartbeat_seconds: float = 20
    # The planner lease: one cohort run at a time plans (DISCOVER + starting apps); a
    # standby retries and takes over within one lease of the leader's death.
    planner_lease_seconds: float = 15
    planner_renew_seconds: float = 10
    planner_retry_seconds: float = 2
    # How long a store outage is waited out (with backoff) before the call fails cleanly.
    store_outage_budget_seconds: float = 300
    # Connections a PostgreSQL store opens at most, as concurrent calls need them: the apps
    # of a cohort leaving a stage together write at once instead of queueing on one.
    store_connections: int = Field(default=4, ge=1)
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
    # Liveness (fleet/mesh/liveness.py): a heartbeat older than `liveness_missed_heartbeats`
    # periods is missed (a beat up to half a period late is not); a missed heartbeat is only the
    # trigger to probe — a probe that answers clears it. The `liveness_confirmations` failed
    # probes of one round are taken `liveness_confirm_spacing_seconds` apart (0: one a round),
    # so a dead machine is down within 1.5 periods + the watchdog's interval + the spacing.
    liveness_confirmations: int = 2
    liveness_missed_heartbeats: float = 1.5
    liveness_confirm_spacing_seconds: float = 5
    agent_health_port: int = 9300
    # host:port of a Prometheus Pushgateway; each cohort run pushes its stage durations and
    # retries there when it ends (the orchestrator's runs are too short-lived to scrape).
    metrics_pushgateway: str = ""
    # Optional bearer token the agent's health endpoint (and /metrics) requires; empty = open.
    agent_health_token: SecretStr | None = None
    # The host other machines reach an agent's health endpoint at (the watchdog probes it);
    # empty: this machine's FQDN when the endpoint binds every interface.
    agent_advertise_host: str = ""
    context_handoff_ratio: float = 0.85
    tmux_chunk_bytes: int = 200
    # Liveness probe: timeout of one health-endpoint check, and a known-good URL checked first
    # so that our own network failing is never taken for the other machine dying ("" = none).
    liveness_probe_timeout_seconds: float = 2
    liveness_reference_url: str = ""
    # WAN peers (seed 001): machine id → SHA-256 fingerprint of the certificate its https
    # health endpoint shows (hex, colons allowed); the probe refuses any other certificate.
    # FLEET_LIVENESS_PINNED_CERTS='{"mac3": "AB:CD:…"}'.
    liveness_pinned_certs: dict[str, str] = {}
    # Node agent (fleet/mesh/agent.py): the mesh it must belong to ("" = any), its panes
    # (one task each), how often its loop wakes, and how much pane history it reads.
    mesh_id: str = ""
    agent_panes: int = 2
    agent_tick_seconds: float = 1
    agent_capture_lines: int = 2000

    # Immune system (DESIGN §5, §9; fleet/mesh/immune.py). Failures of a subject (machine, pane,
    # task type, account) are counted in a sliding window of heartbeats; tier lengths are in
    # heartbeats too. Repeated hard quarantines multiply the exclusion (as Envoy does).
    immune_window_heartbeats: int = 10
    immune_soft_failures: int = 3  # failures in the window → tier 1 (soft)
    immune_hard_failures: int = 5  # failures in the window → tier 2 (hard)
    immune_soft_weight: float = 0.5  # tier 1: routing weight −50 %
    immune_soft_heartbeats: int = 5
    immune_hard_heartbeats: int = 20  # × the ejection count
    immune_max_exclusion_heartbeats: int = 200
    immune_recalibrate_ejections: int = 3  # ejections → tier 3 (recalibrate + alert)
    immune_min_failures: int = 2  # recalibration never lowers a threshold below this
    # …and those failures must be at least this share of the subject's outcomes in the window.
    immune_min_failure_ratio: float = 0.2
    # Safety brakes: at most this share of a kind hard-quarantined at once (at least one when
    # there are two or more; never the only one), and no quarantine at all while this share
    # looks unhealthy (then it is our network, not them).
    immune_max_quarantined_share: float = 0.10
    immune_panic_unhealthy_share: float = 0.55
    # A rate-limited account backs off until the reset time the limit message gives, else this.
    account_backoff_seconds: float = 900
    # The account (agent login or API key name, never the key) this machine's panes run under.
    agent_account: str = ""

    # Feedback metabolism (DESIGN §5; fleet/mesh/metabolism.py): the pace it sets.
    metabolism_min_interval_seconds: float = 30
    metabolism_max_interval_seconds: float = 300
    metabolism_momentum_days: float = 14
    # When on, a node agent whose claim came back empty waits the metabolism's pace (30–300 s)
    # instead of claim_seconds: a quiet mesh polls less, at the cost of slower pick-up.
    agent_metabolism_pacing: bool = False

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

    # Where the pipeline's agent work runs: "" = AuraGateway when configured, else local
    # subprocesses; "mesh" = our own node agents through the mesh queue (MeshDispatcher).
    dispatcher: Literal["", "mesh"] = ""

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
