"""The markers of tests/conftest.py follow from what a test uses (checked on a small suite)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
from tests.conftest import pytest_collection_modifyitems  # the hook under test

@pytest.fixture(scope="session")
def pg_url():
    return "postgresql://unused"

@pytest.fixture(scope="session")
def prefect_harness():
    yield

@pytest.fixture
def db(pg_url):
    return pg_url

@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    return request.param

@pytest.fixture
def servers():
    import libtmux

    def make():
        return libtmux.Server(socket_name="never-started")
    return make
"""

SUITE = """
import subprocess
import sys

import pytest

def test_pure():
    assert True

def test_direct(pg_url):
    pass

def test_through_a_fixture(db):
    pass

def test_backend(backend):
    pass

def test_tmux_in_a_fixture(servers):
    pass

@pytest.mark.usefixtures("prefect_harness")
def test_harness():
    pass

def _demo():
    return [sys.executable, "-m", "fleet.cli", "demo"]

def test_child_fleet_process():
    _demo()

def test_child_other_process():
    subprocess.run([sys.executable, "-m", "json.tool", "--help"], check=False)
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(
        "[pytest]\nmarkers =\n    postgres: pg\n    prefect: api\n    tmux: tmux\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def selected(pytester: pytest.Pytester, expression: str) -> list[str]:
    """The tests `-m expression` selects, by name."""
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-m", expression)
    return sorted(line.split("::")[1] for line in result.outlines if "::" in line)


def test_fixtures_parameters_and_code_decide_the_markers(suite: pytest.Pytester) -> None:
    assert selected(suite, "postgres") == [
        "test_backend[postgres]",
        "test_direct",
        "test_through_a_fixture",
    ]
    assert selected(suite, "prefect") == ["test_child_fleet_process", "test_harness"]
    assert selected(suite, "tmux") == ["test_tmux_in_a_fixture"]


def test_the_inner_loop_is_everything_else(suite: pytest.Pytester) -> None:
    assert selected(suite, "not postgres and not prefect and not tmux") == [
        "test_backend[sqlite]",
        "test_child_other_process",
        "test_pure",
    ]
