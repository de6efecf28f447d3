"""One SQLite file shared by threads and processes: WAL, BEGIN IMMEDIATE writes, clear errors."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.errors import StoreUnavailable


class SQLiteFile:
    """Base of the SQLite backends: opens the file, applies the schema, runs transactions.

    Writes that must be atomic across processes take BEGIN IMMEDIATE (one writer at a
    time, others wait up to the busy timeout); any sqlite3 error becomes StoreUnavailable.
    """

    what = "SQLite store"

    def __init__(self, path: str | Path, schema: str, *, busy_timeout_seconds: float = 30):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_seconds,
                isolation_level=None,
                check_same_thread=False,
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
            self._conn.executescript(schema)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"cannot open the {self.what} at {self.path}: {exc} — check the path is writable "
                "and not on a network filesystem"
            ) from exc
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"{self.what} {self.path}: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"{self.what} {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
