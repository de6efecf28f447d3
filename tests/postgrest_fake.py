"""A PostgREST stand-in at the HTTP level (a respx side effect) over the real PostgreSQL.

It answers the subset of PostgREST that SupabaseStore speaks — table reads with eq/neq/is
filters, order, limit/offset and exact counts, upserts (on_conflict, ignore or merge
duplicates), filtered PATCHes and /rpc/<function> calls — by running the equivalent SQL on
the test database, where supabase/migrations are applied. The claim, fencing and refusal
logic is therefore the real SQL functions', not a re-implementation; errors come back in
PostgREST's JSON shape ({code, message, details, hint}).
"""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

REST = "/rest/v1/"


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _answer(
    status: int, payload: Any = None, *, headers: dict[str, str] | None = None, empty: bool = False
) -> httpx.Response:
    content = b"" if empty else json.dumps(payload, default=_json_default).encode()
    return httpx.Response(
        status, content=content, headers={"Content-Type": "application/json", **(headers or {})}
    )


class PostgrestOverPostgres:
    """`handle(request)` is the respx side effect; `conninfo` the database behind it."""

    def __init__(self, conninfo: str):
        self.conninfo = conninfo
        self.requests: list[tuple[str, str]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = urlsplit(str(request.url))
        path = url.path.removeprefix(REST)
        params = parse_qsl(url.query, keep_blank_values=True)
        prefer = {p.strip() for p in request.headers.get("prefer", "").split(",") if p.strip()}
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, path))
        try:
            with psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row) as conn:
                conn.execute("SET TIME ZONE 'UTC'")
                if path.startswith("rpc/"):
                    return self._rpc(conn, path.removeprefix("rpc/"), body or {})
                if request.method in ("GET", "HEAD"):
                    return self._select(conn, path, params, prefer, head=request.method == "HEAD")
                if request.method == "POST":
                    return self._upsert(conn, path, params, prefer, body)
                if request.method == "PATCH":
                    return self._update(conn, path, params, prefer, body)
        except psycopg.Error as exc:
            return _answer(
                400,
                {
                    "code": exc.sqlstate,
                    "message": exc.diag.message_primary,
                    "details": exc.diag.message_detail,
                    "hint": exc.diag.message_hint,
                },
            )
        return _answer(405, {"code": "PGRST000", "message": f"{request.method} not faked"})

    # Pieces of SQL from the query string ---------------------------------------------
    @staticmethod
    def _filters(params: list[tuple[str, str]]) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = []
        values: list[Any] = []
        for column, condition in params:
            if column in ("select", "order", "limit", "offset", "on_conflict", "columns"):
                continue
            negate = condition.startswith("not.")
            op, _, value = condition.removeprefix("not.").partition(".")
            col = sql.Identifier(column)
            if op == "is" and value == "null":
                clause = sql.SQL("{} IS NULL").format(col)
            elif op in ("eq", "neq"):
                # Compared as text: the query string carries no types.
                clause = sql.SQL("{}::text " + ("=" if op == "eq" else "<>") + " %s").format(col)
                values.append(value)
            else:
                raise AssertionError(f"filter {column}={condition} is not faked")
            clauses.append(sql.SQL("NOT ({})").format(clause) if negate else clause)
        if not clauses:
            return sql.SQL(""), values
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), values

    @staticmethod
    def _columns(spec: str | None) -> sql.Composable:
        if not spec or spec == "*":
            return sql.SQL("*")
        return sql.SQL(", ").join(sql.Identifier(c) for c in spec.split(","))

    def _select(
        self,
        conn: psycopg.Connection,
        table: str,
        params: list[tuple[str, str]],
        prefer: set[str],
        *,
        head: bool,
    ) -> httpx.Response:
        query = dict(params)
        where, values = self._filters(params)
        statement = (
            sql.SQL("SELECT {} FROM {}").format(
                self._columns(query.get("select")), sql.Identifier(table)
            )
            + where
        )
        if "order" in query:
            terms = []
            for term in query["order"].split(","):
                column, _, direction = term.partition(".")
                terms.append(
                    sql.Identifier(column)
                    + sql.SQL(" DESC" if direction.startswith("desc") else " ASC")
                )
            statement += sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms)
        if "limit" in query:
            statement += sql.SQL(" LIMIT {}").format(sql.Literal(int(query["limit"])))
        if "offset" in query:
            statement += sql.SQL(" OFFSET {}").format(sql.Literal(int(query["offset"])))
        rows = conn.execute(statement, values).fetchall()
        headers = {}
        if "count=exact" in prefer:
            headers["Content-Range"] = f"*/{len(rows)}"
        return _answer(200, rows, headers=headers, empty=head)

    def _upsert(
        self,
        conn: psycopg.Connection,
        table: str,
        params: list[tuple[str, str]],
        prefer: set[str],
        body: Any,
    ) -> httpx.Response:
        query = dict(params)
        rows = body if isinstance(body, list) else [body]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        statement = sql.SQL(
            "INSERT INTO {table} ({cols}) "
            "SELECT {cols} FROM jsonb_populate_recordset(NULL::{table}, %s)"
        ).format(table=sql.Identifier(table), cols=cols)
        if "on_conflict" in query:
            target = sql.SQL(", ").join(sql.Identifier(c) for c in query["on_conflict"].split(","))
            if "resolution=ignore-duplicates" in prefer:
                statement += sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(target)
            else:
                updates = sql.SQL(", ").join(
                    sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in columns
                )
                statement += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(target, updates)
        statement += sql.SQL(" RETURNING {}").format(self._columns(query.get("select")))
        written = conn.execute(statement, [json.dumps(rows)]).fetchall()
        if "return=minimal" in prefer:
            return _answer(201, empty=True)
        return _answer(201, written)

    def _update(
        self,
        conn: psycopg.Connection,
        table: str,
        params: list[tuple[str, str]],
        prefer: set[str],
        body: dict[str, Any],
    ) -> httpx.Response:
        where, values = self._filters(params)
        sets = sql.SQL(", ").join(
            sql.SQL("{c} = (jsonb_populate_record(NULL::{t}, %s)).{c}").format(
                c=sql.Identifier(c), t=sql.Identifier(table)
            )
            for c in body
        )
        statement = sql.SQL("UPDATE {} SET ").format(sql.Identifier(table)) + sets + where
        statement += sql.SQL(" RETURNING *")
        written = conn.execute(statement, [json.dumps(body)] * len(body) + values).fetchall()
        if "return=minimal" in prefer:
            return _answer(204, empty=True)
        return _answer(200, written)

    @staticmethod
    def _rpc(conn: psycopg.Connection, function: str, args: dict[str, Any]) -> httpx.Response:
        shape = conn.execute(
            "SELECT p.proretset AS many, t.typtype AS kind FROM pg_proc p "
            "JOIN pg_type t ON t.oid = p.prorettype WHERE p.proname = %s",
            (function,),
        ).fetchone()
        if shape is None:
            return _answer(
                404,
                {
                    "code": "PGRST202",
                    "message": f"no function {function}",
                    "details": None,
                    "hint": None,
                },
            )
        named = sql.SQL(", ").join(
            sql.SQL("{} => %s").format(sql.Identifier(name)) for name in args
        )
        call = sql.SQL("{}({})").format(sql.Identifier(function), named)
        if shape["many"] or shape["kind"] == "c":
            rows = conn.execute(sql.SQL("SELECT * FROM ") + call, list(args.values())).fetchall()
            return _answer(200, rows if shape["many"] else (rows[0] if rows else None))
        value = conn.execute(
            sql.SQL("SELECT ") + call + sql.SQL(" AS v"), list(args.values())
        ).fetchone()["v"]
        return _answer(200, value)
