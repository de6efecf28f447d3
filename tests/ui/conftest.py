"""The UI test's fixtures: a headless Chromium (or a skip saying how to get one) and a real
`prefect server` of the module's own. Using them marks a test `ui` and `prefect`
(tests/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.ui.harness import PrefectServer

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    pytest.skip(
        "the UI test needs headless Chromium and none is on the PATH "
        f"({', '.join(CHROMIUM_NAMES)}): `apt-get install -y chromium` (.ci/run does)"
    )


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server") / "home").start()
    yield server
    server.stop()
