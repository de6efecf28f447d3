"""The chaos suite's shared servers: one Hydra dev server and one Prefect API (the session's
harness) for the session, a gateway per scenario."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.devservers.aura import AuraDevServer
from fleet.devservers.hydra import HydraDevServer
from tests.chaos.test_kill import TOKEN, PrefectApi


@pytest.fixture(scope="session")
def hydra() -> Iterator[HydraDevServer]:
    server = HydraDevServer(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def aura(tmp_path: Path) -> Iterator[AuraDevServer]:
    """A gateway per scenario: effect keys are (app, stage, attempt) only, so two fleets with
    the same app ids on one gateway collide (422) — see the report on issue 8."""
    server = AuraDevServer(token=TOKEN, workdir=tmp_path / "gateway", max_parallel=16).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> PrefectApi:
    """The session harness's API for the `fleet run`s of every scenario."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    db = getattr(url, "get_secret_value", lambda: url)()
    return PrefectApi(str(PREFECT_API_URL.value()), Path(db.split("///", 1)[1]).parent)
