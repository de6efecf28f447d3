"""The Store contract on the SQLite backend, plus what only a file store can show."""

from __future__ import annotations

import pytest

from fleet.store import open_store
from fleet.store.sqlite import SQLiteStore
from tests.store_contract import (
    StoreContract,
    assert_state_survived,
    write_state_to_survive,
)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "fleet.db")
    yield s
    s.close()


class TestSQLiteStore(StoreContract):
    pass


def test_state_survives_reopening_the_file(tmp_path):
    path = tmp_path / "fleet.db"
    first = open_store(f"sqlite:///{path}")
    written = write_state_to_survive(first)
    first.close()
    second = open_store(f"sqlite:///{path}")
    assert_state_survived(second, written)
    second.close()


def test_unknown_store_url_is_refused_without_leaking_credentials():
    from fleet.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        open_store("mysql://admin:hunter2@db/fleet")
    assert "hunter2" not in str(err.value) and "sqlite:///" in str(err.value)
