"""A test using the `chromium` fixture is marked `ui`, and so `prefect`: the fast inner loop
(`not postgres and not prefect and not tmux`) leaves it out."""

from __future__ import annotations

import pytest

from tests.test_markers import CONFTEST as BASE_CONFTEST
from tests.test_markers import selected

pytest_plugins = ["pytester"]

CONFTEST = (
    BASE_CONFTEST
    + """
@pytest.fixture(scope="module")
def chromium():
    return "/usr/bin/chromium"

@pytest.fixture(scope="module")
def prefect_server():
    yield "http://127.0.0.1:4200"

@pytest.fixture(scope="module")
def seen(chromium, prefect_server):
    return chromium, prefect_server
"""
)

SUITE = """
def test_pure():
    pass

def test_through_the_ui_fixture(seen):
    pass

def test_only_a_browser(chromium):
    pass
"""


def test_the_ui_test_is_marked_ui_and_prefect_and_left_out_of_the_inner_loop(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        "[pytest]\nmarkers =\n    postgres: pg\n    prefect: api\n    tmux: tmux\n    ui: browser\n"
    )
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    assert selected(pytester, "ui") == ["test_only_a_browser", "test_through_the_ui_fixture"]
    assert selected(pytester, "prefect") == ["test_only_a_browser", "test_through_the_ui_fixture"]
    assert selected(pytester, "not postgres and not prefect and not tmux") == ["test_pure"]
