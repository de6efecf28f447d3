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
        "wins over the store: change it in the block (Prefect UI → Blocks), or clear the "
        "field there first"
    )
    env = {"FLEET_MAX_CONCURRENT": "6"}
    pinned = config_sources(settings_from(env, monkeypatch), env, {}, None)
    assert "FLEET_MAX_CONCURRENT" in (shadowed_write(pinned, "max_concurrent") or "")
    free = config_sources(settings_from({}, monkeypatch), {}, {"max_concurrent": 3}, None)
    assert shadowed_write(free, "max_concurrent") is None
    assert shadowed_write(sources, "max_concurrent", layer="block") is None


# The rule wired into the flows (flows/config.py) and the claim's live limit --------------
@pytest.fixture
def wired(tmp_path, monkeypatch):
    """resolve() over a real SQLite store and the demo fleet, with exactly the env given."""
    from fleet.wiring import reset_components
    from flows.config import resolve
    from tests.helpers import demo_fleet

    fleet = demo_fleet(tmp_path)
    base = {"FLEET_HOME": str(tmp_path / "home"), "FLEET_STORE_URL": f"sqlite:///{tmp_path}/f.db"}

    def wire(env: dict[str, str], block=None, fleet_file: str | None = None):
        env = {**base, **env}
        return resolve(settings_from(env, monkeypatch), env, block, fleet_file)

    reset_components()
    yield wire, fleet
    reset_components()


def test_a_block_pin_beats_the_store_and_is_never_written_to_it(wired):
    from blocks.fleet_config import FleetConfigBlock
    from fleet.claim import max_concurrent

    wire, fleet = wired
    block = FleetConfigBlock(fleet_file=str(fleet), max_concurrent=2, review_target="mac9")
    comp = wire({}, block)  # no fleet file passed: the block's applies
    assert comp.fleet.app_ids == ["demo-calc", "demo-notes", "demo-weather"]
    comp.store.set_fleet_config(FleetConfig(max_concurrent=3))
    assert max_concurrent(comp) == 2
    assert comp.settings.review_target == "mac9"
    assert "max_concurrent" in comp.pinned and "review_target" in comp.pinned
    assert comp.store.get_fleet_config().max_concurrent == 3  # the store keeps its own value


def test_the_environment_beats_the_block(wired):
    from blocks.fleet_config import FleetConfigBlock
    from fleet.claim import max_concurrent

    wire, fleet = wired
    comp = wire({"FLEET_MAX_CONCURRENT": "5"}, FleetConfigBlock(max_concurrent=2), str(fleet))
    comp.store.set_fleet_config(FleetConfig(max_concurrent=3))
    assert max_concurrent(comp) == 5


def test_without_a_pin_the_store_value_is_live(wired):
    from fleet.claim import max_concurrent

    wire, fleet = wired
    comp = wire({}, None, str(fleet))
    assert max_concurrent(comp) == 4  # the default
    comp.store.set_fleet_config(FleetConfig(max_concurrent=3))
    assert max_concurrent(comp) == 3
    comp.store.set_fleet_config(FleetConfig(max_concurrent=6))  # the dashboard turns the knob
    assert max_concurrent(comp) == 6


def test_which_fleet_file_a_run_uses(wired, tmp_path):
    from blocks.fleet_config import FleetConfigBlock
    from fleet.errors import ConfigError

    wire, fleet = wired
    other = tmp_path / "other.yaml"
    other.write_text(fleet.read_text().replace("demo-weather", "demo-other"))
    block = FleetConfigBlock(fleet_file=str(other))
    assert "demo-other" in wire({}, block).fleet.app_ids  # the block's
    assert "demo-other" not in wire({}, block, str(fleet)).fleet.app_ids  # the run's own
    env = {"FLEET_FLEET_FILE": str(fleet)}
    assert "demo-other" not in wire(env, block).fleet.app_ids  # the environment's
    assert "demo-other" not in wire(env, block, "").fleet.app_ids  # "" passes none
    with pytest.raises(ConfigError, match="no fleet file"):
        wire({}, None)
