"""Named SQL queries, read once from a package's .sql file: `queries["claim_task"]`.

A file holds blocks that each start with a `-- name: <query_name>` line; the SQL up to the
next such line is that query (comments kept, one statement per name). Python passes
parameters by name and never assembles SQL from pieces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """The named queries in `text`; text before the first name is the file's header."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, sql in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        sql = sql.strip()
        if not sql:
            raise ValueError(f"query {name!r} has no SQL")
        queries[name] = sql
    return queries


@cache
def load(package: str, filename: str) -> Mapping[str, str]:
    """The named queries of `package`/`filename`, read on the first call only."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    return MappingProxyType(parse(text))
