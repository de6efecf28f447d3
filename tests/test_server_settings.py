"""The Prefect server settings the engine applies are ones Prefect reads, with the values set."""

from __future__ import annotations

import os

import pytest

from deployments.server_settings import SERVER_SETTINGS, apply_server_settings


@pytest.fixture
def unset(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the settings set; whatever apply_server_settings sets is undone afterwards."""
    for name in SERVER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_prefect_reads_every_server_setting_the_engine_applies(unset) -> None:
    """A Prefect upgrade that renamed one would leave it silently unused."""
    from prefect.settings import Settings

    apply_server_settings()
    seen = Settings().to_environment_variables(exclude_unset=False)
    assert {name: str(seen.get(name)).lower() for name in SERVER_SETTINGS} == SERVER_SETTINGS


def test_an_operator_value_is_kept(unset) -> None:
    name = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"
    unset.setenv(name, "7")
    apply_server_settings()
    assert os.environ[name] == "7" != SERVER_SETTINGS[name]
