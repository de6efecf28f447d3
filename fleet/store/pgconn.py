"""The one PostgreSQL connector of the pipeline and mesh stores (psycopg 3).

It owns the connection and its policy, so both stores behave alike:
- up to `connections` connections shared by threads, each opened when concurrency first
  needs it, in autocommit, with the session in UTC and statement and lock timeouts (a held
  lock or a hung server is an error the caller sees, never a hang). A thread holds one for
  a call (a nested call on that thread uses the same one); past the limit a call waits
  for a free one;
- server-side prepared statements off (`prepare_threshold=None`): Supabase's transaction
  pooler hands each transaction to any server connection, where a statement prepared on
  another one does not exist;
- a connection found dropped is reopened, and the call repeated once when repeating it
  cannot do anything twice (`retry_safe`);
- driver errors are mapped in one place: the SQL functions' refusals to StaleLease /
  InvalidTransition (fleet/store/refusals.py), a server out of reach to StoreUnreachable
  (an outage callers wait out, fleet/store/outage.py), everything else to
  StoreUnavailable, with any password in the message masked.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import SecretStr

from fleet.errors import ConfigError, StoreUnavailable
from fleet.store.refusals import REFUSAL_SQLSTATE, StoreUnreachable, refusal, unreachable_code

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str, password: str | None = None) -> str:
    """`text` with any password (URI userinfo, password=…, or the known one) masked."""
    if password:
        text = text.replace(password, "***")
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _KEYWORD_PASSWORD.sub(r"\1***", text)


def describe(conninfo: str) -> tuple[str, str | None]:
    """Where a conninfo points (user@host:port/db) and its password, if it has one."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        # A config mistake, not an outage: retrying will not help. The driver's message
        # may quote the string, so it is redacted.
        raise ConfigError(
            f"invalid PostgreSQL connection string: {redact(str(exc).strip())} — expected "
            "postgresql://user@host:5432/db or 'host=… dbname=…' (FLEET_STORE_URL)"
        ) from None
    host, port = params.get("host") or "localhost", params.get("port") or 5432
    where = f"{host}:{port}/{params.get('dbname') or ''}"
    if params.get("user"):
        where = f"{params['user']}@{where}"
    password = params.get("password")
    return where, str(password) if password else None


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every call, in seconds."""

    connect: float = 10
    statement: float = 30
    lock: float = 10


@dataclass
class _Slot:
    """One of the connector's connections (None until a call needs it, or after a drop)."""

    conn: psycopg.Connection[dict[str, Any]] | None = None


class PgConnector:
    """A PostgreSQL connection with the project's one policy (see the module docstring).

    `label` names the store in errors ("PostgreSQL store", "PostgreSQL mesh store");
    `advice` ends every StoreUnavailable message with what the operator can check.
    """

    def __init__(
        self,
        conninfo: str | SecretStr,
        *,
        label: str = "PostgreSQL store",
        advice: str = "check that the server is up and FLEET_STORE_URL points at it",
        timeouts: Timeouts = Timeouts(),
        application_name: str = "fleet",
        connections: int = 1,
    ):
        self._conninfo = conninfo if isinstance(conninfo, SecretStr) else SecretStr(conninfo)
        self.where, password = describe(self._conninfo.get_secret_value())
        self._password = SecretStr(password) if password else None  # kept only to redact errors
        self._label = label
        self._advice = advice
        self._timeouts = timeouts
        self._application_name = application_name
        if connections < 1:
            raise ConfigError(f"{label}: connections must be at least 1, not {connections}")
        self._size = connections
        # Last in, first out: calls that never overlap keep reusing one open connection.
        self._free: queue.LifoQueue[_Slot] = queue.LifoQueue()
        for _ in range(connections):
            self._free.put(_Slot())
        self._mine = threading.local()  # the slot this thread holds, if any

    def __repr__(self) -> str:
        return f"PgConnector({self.where!r})"

    @property
    def conninfo(self) -> SecretStr:
        return self._conninfo

    # Errors ------------------------------------------------------------------------
    def unavailable(
        self, what: str, exc: BaseException, *, unreachable: bool = False
    ) -> StoreUnavailable:
        """StoreUnavailable (StoreUnreachable for an outage) for a failed `what`, the
        driver's message redacted."""
        detail = redact(
            str(exc).strip(), self._password.get_secret_value() if self._password else None
        )
        error = StoreUnreachable if unreachable else StoreUnavailable
        return error(
            f"{self._label} at {self.where}: {what}: {type(exc).__name__}: {detail} — "
            f"{self._advice}"
        )

    def _mapped(self, exc: psycopg.Error, *, lost: bool) -> Exception:
        """The project's exception for a driver error (the one mapping table)."""
        if exc.sqlstate == REFUSAL_SQLSTATE:
            refused = refusal(exc.diag.message_primary or str(exc))
            if refused is not None:
                return refused
        return self.unavailable(
            "connection lost" if lost else "query failed",
            exc,
            unreachable=lost or unreachable_code(exc.sqlstate),
        )

    # Connection ----------------------------------------------------------------------
    @contextmanager
    def _slot(self) -> Iterator[_Slot]:
        """The connection slot this thread holds (a nested call), else a free one, waiting
        while every connection is in use."""
        held: _Slot | None = getattr(self._mine, "slot", None)
        if held is not None:
            yield held
            return
        slot = self._free.get()
        self._mine.slot = slot
        try:
            yield slot
        finally:
            self._mine.slot = None
            self._free.put(slot)

    def _connection(self, slot: _Slot) -> psycopg.Connection[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        if slot.conn is None or slot.conn.closed or slot.conn.broken:
            self._drop(slot)
            try:
                conn = psycopg.connect(
                    self._conninfo.get_secret_value(),
                    autocommit=True,
                    prepare_threshold=None,  # transaction pooler: no server-side prepares
                    connect_timeout=max(1, round(self._timeouts.connect)),
                    application_name=self._application_name,
                    row_factory=dict_row,
                )
                # One round trip; the values are parameters, never text spliced into SQL.
                conn.execute(
                    "SELECT set_config('TimeZone', 'UTC', false), "
                    "set_config('statement_timeout', %s, false), "
                    "set_config('lock_timeout', %s, false)",
                    (
                        str(round(self._timeouts.statement * 1000)),
                        str(round(self._timeouts.lock * 1000)),
                    ),
                )
            except psycopg.Error as exc:
                # `from None`: the driver's error may quote the connection string.
                raise self.unavailable("cannot connect", exc, unreachable=True) from None
            slot.conn = conn
        return slot.conn

    @staticmethod
    def _drop(slot: _Slot) -> None:
        if slot.conn is not None:
            with contextlib.suppress(Exception):  # already gone: nothing left to release
                slot.conn.close()
            slot.conn = None

    def run(
        self,
        work: Callable[[psycopg.Connection[dict[str, Any]]], T],
        *,
        retry_safe: bool = True,
        transaction: bool = False,
    ) -> T:
        """`work(conn)` under the lock (in one transaction with `transaction`); a dropped
        connection is reopened and, when `retry_safe`, the work repeated once."""
        import psycopg

        with self._slot() as slot:
            for attempt in (1, 2):
                conn = self._connection(slot)
                try:
                    if not transaction:
                        return work(conn)
                    with conn.transaction():
                        return work(conn)
                except psycopg.Error as exc:
                    lost = conn.closed or conn.broken
                    if lost:
                        self._drop(slot)
                        if retry_safe and attempt == 1:
                            continue
                    # `from None`: the chained driver error may quote the connection string.
                    raise self._mapped(exc, lost=lost) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """The shared connection inside one transaction, under the lock; never repeated
        after a drop (it may have committed)."""
        import psycopg

        with self._slot() as slot:
            conn = self._connection(slot)
            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                lost = conn.closed or conn.broken
                if lost:
                    self._drop(slot)
                raise self._mapped(exc, lost=lost) from None

    def fetch(
        self, sql: str, params: Any = None, *, retry_safe: bool = True
    ) -> list[dict[str, Any]]:
        """Every row of one statement."""
        return self.run(lambda conn: conn.execute(sql, params).fetchall(), retry_safe=retry_safe)

    def fetch_one(
        self, sql: str, params: Any = None, *, retry_safe: bool = True
    ) -> dict[str, Any] | None:
        """The first row of one statement, or None."""
        return self.run(lambda conn: conn.execute(sql, params).fetchone(), retry_safe=retry_safe)

    def execute(self, sql: str, params: Any = None, *, retry_safe: bool = True) -> None:
        self.run(lambda conn: conn.execute(sql, params), retry_safe=retry_safe)

    def close(self) -> None:
        """Close every connection, each once its call in flight is over (a later call opens
        one again)."""
        held: _Slot | None = getattr(self._mine, "slot", None)
        if held is not None:
            self._drop(held)
        others = [self._free.get() for _ in range(self._size - (held is not None))]
        for slot in others:
            self._drop(slot)
            self._free.put(slot)
