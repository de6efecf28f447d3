"""Session-wide fixtures: isolated state dirs, one Prefect harness, a throwaway PostgreSQL database."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

# Isolate Prefect and the engine before anything imports them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="fleet-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect" / "storage")
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["FLEET_HOME"] = str(_SESSION_DIR / "fleet")
# Stage retries and Hydra polls at test speed; thresholds themselves are tested with a ManualClock.
os.environ["FLEET_RETRY_DELAY_SECONDS"] = "0.1"
os.environ["FLEET_HYDRA_POLL_SECONDS"] = "1"
os.environ["FLEET_GATEWAY_POLL_INITIAL_SECONDS"] = "0.05"
os.environ["FLEET_GATEWAY_POLL_MAX_SECONDS"] = "0.5"

PG_ADMIN_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (ephemeral API on a temp SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh database on the local PostgreSQL, dropped at the end of the session."""
    psycopg = pytest.importorskip("psycopg")
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def tmp_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    from fleet.settings import get_settings

    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()
