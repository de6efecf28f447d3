"""The one table that maps the SQL functions' refusals to the domain's exceptions.

The pipeline's SQL functions (0001_pipeline.sql) refuse a write by raising SQLSTATE P0001
with a message that starts with a known prefix; every backend that reaches them (psycopg,
PostgREST) turns that message into the same exception here.
"""

from __future__ import annotations

from fleet.errors import FleetError, InvalidTransition, StaleLease

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
