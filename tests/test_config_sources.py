"""One configuration rule: environment > FleetConfig block > store > default, per setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.config_sources import (
    SECRET_SHOWN,
    config_sources,
    effective_settings,
    env_vars,
    shadowed_write,
)
from fleet.models import FleetConfig
from fleet.settings import FleetSettings

BLOCK = {
    "fleet_file": "/srv/fleet.yaml",
    "max_concurrent": 2,
    "cohort_sizes": None,
    "review_target": "mac5",
    "review_model": None,
    "ship_target": None,
    "hydra_poll_seconds": None,
}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FleetSettings:
    """FleetSettings as the engine builds it, from exactly this environment."""
    for name in list(os.environ):
        if name.startswith("FLEET_") or name == "GEMINI_API_KEY":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return FleetSettings()


def test_each_layer_wins_over_the_ones_below_it(monkeypatch):
    env = {"FLEET_REVIEW_TARGET": "mac9", "FLEET_COHORT_SIZES": "[5, 15]"}
    s = config_sources(
        settings_from(env, monkeypatch), env, FleetConfig(max_concurrent=3).model_dump(), BLOCK
    )
    assert (s["review_target"].value, s["review_target"].source) == ("mac9", "environment")
    assert s["review_target"].shadowed == ("block",)
    assert (s["cohort_sizes"].value, s["cohort_sizes"].source) == ([5, 15], "environment")
    assert (s["max_concurrent"].value, s["max_concurrent"].source) == (2, "block")
    assert s["max_concurrent"].shadowed == ("store",)
    assert (s["fleet_file"].value, s["fleet_file"].source) == ("/srv/fleet.yaml", "block")
    assert (s["task_floor"].value, s["task_floor"].source) == (3, "default")
    assert s["task_floor"].shadowed == ()


def test_the_store_applies_when_neither_env_nor_block_sets_it(monkeypatch):
    s = config_sources(settings_from({}, monkeypatch), {}, {"max_concurrent": 7}, None)
    assert (s["max_concurrent"].value, s["max_concurrent"].source) == (7, "store")
    unset = config_sources(settings_from({}, monkeypatch), {}, {"max_concurrent": None}, None)
    assert (unset["max_concurrent"].value, unset["max_concurrent"].source) == (4, "default")


def test_env_names_are_matched_as_pydantic_settings_reads_them(monkeypatch):
    env = {"fleet_task_floor": "5", "GEMINI_API_KEY": "k-123"}
    s = config_sources(settings_from(env, monkeypatch), env, {}, None)
    assert (s["task_floor"].value, s["task_floor"].source) == (5, "environment")
    assert s["gemini_api_key"].source == "environment"
    assert s["gemini_api_key"].shown == SECRET_SHOWN  # a secret's value is never shown
    assert env_vars("gemini_api_key") == ("FLEET_GEMINI_API_KEY", "GEMINI_API_KEY")
    assert env_vars("max_concurrent") == ("FLEET_MAX_CONCURRENT",)


def test_every_setting_is_listed_and_shown_as_plain_data(monkeypatch):
    s = config_sources(
        settings_from({"FLEET_HOME": "/var/fleet"}, monkeypatch),
        {"FLEET_HOME": "/var/fleet"},
        {},
        None,
    )
    assert list(s) == list(FleetSettings.model_fields)
    assert s["home"].value == Path("/var/fleet") and s["home"].shown == "/var/fleet"
    assert s["aura_token"].shown is None


def test_effective_settings_apply_the_winners_only(monkeypatch):
    env = {"FLEET_REVIEW_TARGET": "mac9"}
    settings = settings_from(env, monkeypatch)
    sources = config_sources(
        settings, env, {"max_concurrent": 3}, {"review_target": "mac5", "hydra_poll_seconds": 30}
    )
    effective = effective_settings(settings, sources)
    assert effective.review_target == "mac9"
    assert effective.max_concurrent == 3
    assert effective.hydra_poll_seconds == 30.0
    assert effective.task_floor == 3


def test_a_store_write_the_block_or_env_would_override_is_explained(monkeypatch):
    sources = config_sources(settings_from({}, monkeypatch), {}, {"max_concurrent": 3}, BLOCK)
    warning = shadowed_write(sources, "max_concurrent", block_name="fleet-config/prod")
    assert warning == (
        "max_concurrent is pinned to 2 by the FleetConfig block 'fleet-config/prod', which "
        "takes precedence over the store; the new value applies only once you clear the "
        "field in the block (Prefect UI → Blocks)"
    )
    env = {"FLEET_MAX_CONCURRENT": "6"}
    pinned = config_sources(settings_from(env, monkeypatch), env, {}, None)
    assert "FLEET_MAX_CONCURRENT" in (shadowed_write(pinned, "max_concurrent") or "")
    free = config_sources(settings_from({}, monkeypatch), {}, {"max_concurrent": 3}, None)
    assert shadowed_write(free, "max_concurrent") is None
    assert shadowed_write(sources, "max_concurrent", layer="block") is None
