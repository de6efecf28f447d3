"""Session-wide fixtures (isolated state, one Prefect harness, a throwaway PostgreSQL database)
and the markers each test gets from what it uses."""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Isolate Prefect and the engine before anything imports them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="fleet-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect" / "storage")
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
# As deployments/server_settings.py sets them for a real server: `--watch` streams run logs.
os.environ["PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED"] = "true"
os.environ["PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"] = "true"
os.environ["FLEET_HOME"] = str(_SESSION_DIR / "fleet")
# Stage retries and Hydra polls at test speed; thresholds themselves are tested with a ManualClock.
os.environ["FLEET_RETRY_DELAY_SECONDS"] = "0.1"
os.environ["FLEET_HYDRA_POLL_SECONDS"] = "1"
os.environ["FLEET_GATEWAY_POLL_INITIAL_SECONDS"] = "0.05"
os.environ["FLEET_GATEWAY_POLL_MAX_SECONDS"] = "0.5"

PG_ADMIN_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# The markers follow from what a test uses, so `-m "not postgres and not prefect and not tmux"`
# is the fast inner loop without anyone remembering to mark a test.
# A test using one of these fixtures, directly or through other fixtures, gets the marker.
FIXTURE_MARKS = {
    "pg_url": "postgres",
    "prefect_harness": "prefect",
    "prefect_server": "prefect",  # tests/ui: a `prefect server` of its own
    "chromium": "ui",  # tests/ui: headless Chromium against that server
}
# Backend fixtures parametrized over "sqlite" and "postgres" ask for the database only inside
# (request.getfixturevalue), so the parameter is what shows that PostgreSQL is used.
PARAM_MARKS = {"postgres": "postgres"}
# Names in the code of the test or of any fixture it uses (nested functions included).
CODE_NAME_MARKS = {"libtmux": "tmux"}
# A child process started as `python -m fleet.cli ...` or `python -m prefect ...` starts or
# reaches a Prefect API of its own; seen in the test's code or a module-level helper it calls.
CHILD_MODULE_MARKS = {"fleet.cli": "prefect", "prefect": "prefect"}
# A browser test looks at a Prefect server's UI: it is slow like one, whatever it reaches.
IMPLIED_MARKS = {"ui": "prefect"}


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """A code object and every code object nested in it (inner functions, lambdas)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _child_modules(function: Callable[..., object]) -> set[str]:
    """The modules a function runs with `-m` (the constant right after "-m" in its code)."""
    return {
        str(after)
        for code in _codes(function.__code__)
        for before, after in itertools.pairwise(code.co_consts)
        if before == "-m"
    }


def _markers_from_use(item: pytest.Function) -> set[str]:
    """The markers that what `item` uses calls for (see the tables above)."""
    marks = {FIXTURE_MARKS[name] for name in item.fixturenames if name in FIXTURE_MARKS}
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    marks |= {PARAM_MARKS[p] for p in params if isinstance(p, str) and p in PARAM_MARKS}

    fixturedefs = item._fixtureinfo.name2fixturedefs
    functions = [item.function]
    functions += [d.func for name in item.fixturenames for d in fixturedefs.get(name, ())]
    names = {name for f in functions for code in _codes(f.__code__) for name in code.co_names}
    marks |= {CODE_NAME_MARKS[name] for name in names if name in CODE_NAME_MARKS}

    helpers = [getattr(item.module, name, None) for name in item.function.__code__.co_names]
    children = set().union(
        *(_child_modules(f) for f in [item.function, *helpers] if isinstance(f, types.FunctionType))
    )
    marks |= {CHILD_MODULE_MARKS[module] for module in children if module in CHILD_MODULE_MARKS}
    return marks | {IMPLIED_MARKS[m] for m in marks if m in IMPLIED_MARKS}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function):
            for marker in sorted(_markers_from_use(item) - {m.name for m in item.iter_markers()}):
                item.add_marker(marker)


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


@pytest.fixture
def pushgateway():
    """A local HTTP server speaking a Prometheus Pushgateway's PUT /metrics/job/...: yields
    (host:port, [(method, path, body)])."""
    pushed: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            pushed.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", pushed
    server.shutdown()
