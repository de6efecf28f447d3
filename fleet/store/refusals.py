"""The one table that maps the SQL functions' refusals to the domain's exceptions.

The pipeline's SQL functions (0001_pipeline.sql) refuse a write by raising SQLSTATE P0001
with a message that starts with a known prefix; every backend that reaches them (psycopg,
PostgREST) turns that message into the same exception here.
"""

from __future__ import annotations

from fleet.errors import FleetError, InvalidTransition, StaleLease, StoreUnavailable

REFUSAL_SQLSTATE = "P0001"
REFUSALS: dict[str, type[FleetError]] = {
    "stale_lease:": StaleLease,
    "invalid_transition:": InvalidTransition,
}


def refusal(message: str) -> FleetError | None:
    """The domain exception a refusal message stands for, or None if it is not a refusal."""
    for prefix, error in REFUSALS.items():
        if message.startswith(prefix):
            return error(message.removeprefix(prefix).strip())
    return None


class StoreUnreachable(StoreUnavailable):
    """The store could not be reached (connection refused, dropped, server shutting down or
    out of connections): an outage to wait out, unlike a query the store refused."""


# SQLSTATE classes of an outage rather than of the query: 08 connection exception,
# 53 insufficient resources (too many connections), 57 operator intervention (shutdown,
# cannot connect now); PostgREST's PGRST000-PGRST003: it cannot reach its database.
_UNREACHABLE_CLASSES = ("08", "53", "57")
_UNREACHABLE_POSTGREST = {"PGRST000", "PGRST001", "PGRST002", "PGRST003"}


def unreachable_code(code: str | None) -> bool:
    """Whether an error code (SQLSTATE or PostgREST's) means the database is out of reach."""
    if not code:
        return False
    return code in _UNREACHABLE_POSTGREST or code[:2] in _UNREACHABLE_CLASSES
